"""Scene sources: one module per dataset layout, all registered by ``kind``.

See :mod:`distill3r.data.sources.base` for the interface; importing this package registers
every built-in kind.
"""

from distill3r.data.sources.base import (SOURCES, Frame, Scene, SceneRef, SkipFrame, Source,
                                         make_source, register_source)
# importing a module registers its kinds
from distill3r.data.sources import (arkitscenes, blendedmvs, co3d, colmap,  # noqa: F401
                                    habitat, megadepth, scannetpp, simple)

__all__ = ["SOURCES", "Frame", "Scene", "SceneRef", "SkipFrame", "Source", "make_source",
           "register_source"]
