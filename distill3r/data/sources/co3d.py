"""co3d source (being written)."""
