"""Distill3R: distil a multi-view 3D reconstruction teacher into a compact student."""

__version__ = "0.1.0"
