"""Student architecture configuration and the registry of named variants.

A :class:`StudentConfig` fully describes the architecture (it is what ``config.json`` of a
saved student holds); run-time options such as the DPT-head chunk size are not part of it.

Named variants (``MODEL_CONFIGS`` / :func:`get_config`):

- ``paper``: the published 72M student (71,969,288 parameters): DUNE ViT-S/14 encoder
  (timm ``vit_small_patch14_reg4_dinov2`` layout, 32x32 position grid), 6-block fusion
  decoder of width 384, two DPT heads on hooks [0, 3, 4, 6].
- ``tiny``: a ~8M model with the same structure for tests and the CPU demo (112x112, 4 views).
- ``tiny-lite``: ``tiny`` with DPT heads of half the width ([16, 32, 64, 128], feature 32,
  last 16; 5.5M parameters). The full-resolution heads are most of ``tiny``'s training cost:
  a training step of ``tiny-lite`` (batch 4 x 4 views at 112x112, 2 CPU cores) takes about
  two thirds of ``tiny``'s in bf16 (0.22 s vs 0.33 s, AVX512-BF16) and half in fp32.
- ``tiny-fine``: ``tiny-lite`` with 8-pixel patches: a 14x14 token grid at 112x112 instead of
  8x8, so the heads draw from four times as many tokens and correspondences between views are
  found on a grid twice as fine (about 2.7x ``tiny-lite``'s training step time). On the demo's
  consecutive views it placed views better than ``tiny-lite`` (mAA(30) 0.36 vs 0.33) at twice
  the default student's training time (README "Results").
- ``tiny-pose``: ``tiny-lite`` whose global head is a pose head
  (:mod:`distill3r.models.pose_head`): the global map is the local map moved by a predicted
  per-view similarity, so view placement is learned as 10 numbers per view instead of being
  drawn pixel by pixel by a second DPT head (which also makes a step cheaper). On the demo it
  gave the best depth but worse poses than ``tiny-lite`` (README "Results").
- ``tiny-conv``: ``tiny-lite`` whose encoder embeds patches with a small convolutional stem
  (:class:`distill3r.models.encoder.ConvStemEmbed`: a 3x3 stride-2 conv and a 3x3 conv of width
  32, then a 7x7 stride-7 patchify conv) instead of one 14x14 linear patch projection. Without
  pretrained encoder weights a ViT learns slowly from a few hundred scenes; early convolutions
  give it local image features from the first step. DUNE weights do not fit this encoder.
- ``tiny-skip``: ``tiny-lite`` whose DPT heads also see the image (``dpt_image_dim`` 16, the
  image branch of :class:`distill3r.models.dpt.DPTHead`): object outlines at the heads' finest
  levels instead of only what an 8x8 token grid carries.
- ``tiny-hybrid``: ``tiny-lite`` with both: the convolutional stem of ``tiny-conv`` and the
  image branch of ``tiny-skip`` (5.7M parameters, about 1.2x ``tiny-lite``'s step time). On the
  demo it matched or beat ``tiny-lite`` on every figure (README "Results").
- ``tiny-pyramid``: ``tiny-hybrid`` whose image branch is a small convolutional pyramid
  (``dpt_image_blocks`` 2: stages of width 16, 32, 64, 128 at the finest fusion size and 1/2,
  1/4, 1/8 of it, two residual conv units each, feeding the output path and the three finest
  DPT levels; the role of DPT-Hybrid's ResNet stages), so the heads get image features with a
  receptive field of whole objects (7.5M parameters, about 1.4x ``tiny-hybrid``'s step). On the
  demo: better depth, much worse poses (README "Results").
- ``tiny-pyramid-local``: ``tiny-pyramid`` with the pyramid in the local head only
  (``dpt_image_heads: local``); the global head is ``tiny-conv``'s and sees the image only
  through the tokens (6.6M parameters, about 1.15x ``tiny-hybrid``'s step). The CPU demo's
  student: on the demo (two seeds each) better depth and dense geometry than ``tiny-hybrid``,
  poses within the run-to-run spread (README "Results").
- ``tiny-pyramid-full``: ``tiny-pyramid-local`` whose local head also sees the pixels at the
  output size (``dpt_image_full`` 16: two 3x3 convs at 112x112 added to the output stage).
  With 14-pixel patches the DPT fusion path ends at 64x64, which the output stage only
  upsamples: the pixels next to depth edges carry 1.7x the mean depth error there
  (+3k parameters, +5% FLOPs, 1.13x the training time). On the demo (one seed) worse on every
  depth and shape figure than ``tiny-pyramid-local`` (README "Results"), normal consistency
  most (0.724 against 0.758): the surfaces came out rougher, not their edges sharper.
- ``tiny-pyramid-gn``: ``tiny-pyramid-local`` whose local head normalises before each ReLU
  of its residual conv units (``dpt_norm: local``, GroupNorm; +3k parameters, about 1.1x the
  training time). In the trained default most of those ReLUs pass 5-30% of their inputs. On
  the demo (one seed) slightly better depth AbsRel (0.112 against 0.115) and worse
  everything else: Chamfer, normal consistency (0.733, under the layout prior's), delta<1.25
  and poses (README "Results").
- ``tiny-deep``: ``tiny-pyramid-local`` with a 6-block fusion decoder whose blocks 3, 4 and 6
  feed the heads, as in ``paper`` (7.5M parameters): more capacity where the views are placed
  relative to each other, at little cost (the decoder runs on 64 tokens per view; 1.03x
  ``tiny-pyramid-local``'s training time). On the demo (two seeds): the same validation
  loss, slightly better poses, a worse global-head map (README "Results").
- ``tiny-fine-pyramid``: ``tiny-pyramid-local`` with 8-pixel patches (the token grid of
  ``tiny-fine``, the local head's pyramid of ``tiny-pyramid-local``; 6.4M parameters, about
  2.6x ``tiny-pyramid-local``'s step time). On the demo (two seeds) better depth and poses
  than ``tiny-pyramid-local`` for 2.1x its training time (README "Results").
- ``micro``: a ~1.7M model with the same structure (width 96, 4 encoder and 3 decoder blocks,
  narrower DPT heads): the student of the learned-teacher study (``studies/distill``), whose
  teacher is a ``tiny``.
- ``fast3r-large``: a Fast3R-sized reference (ViT-L/16 encoder, 24x1024 fusion decoder, heads
  on [0, 12, 18, 24]); random weights, only for measuring cost. Fast3R's encoder uses 2-D RoPE;
  this stand-in has no position encoding at all (RoPE has no parameters and little cost).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from distill3r.config import from_dict as _strict_from_dict

XYZ_ACTIVATIONS = ("exp", "linear")
CONF_ACTIVATIONS = ("expp1",)
GLOBAL_HEADS = ("dpt", "pose")
IMAGE_HEADS = ("both", "local")
NORM_HEADS = ("none", "local", "both")


@dataclass
class StudentConfig:
    """Architecture of a student. Hook 0 is the encoder output, hook k >= 1 the output of
    fusion-decoder block k (the last block's output passes the decoder's final LayerNorm)."""

    name: str
    patch_size: int = 14
    img_size: int = 448  # the learned position grid is (img_size // patch_size)^2
    # encoder (a timm VisionTransformer)
    enc_dim: int = 384
    enc_depth: int = 12
    enc_heads: int = 6
    enc_mlp_ratio: float = 4.0
    enc_class_token: bool = True
    enc_reg_tokens: int = 4
    enc_pos_embed: str = "learn"  # "learn" (bicubic-resampled per input size) | "none"
    enc_layerscale: Optional[float] = 1e-5  # LayerScale init value; null: no LayerScale
    # 0: the ViT's p x p patch embedding (what DUNE weights fit); > 0: a convolutional stem of
    # this width instead (models.encoder.ConvStemEmbed; even patch sizes only)
    enc_stem_dim: int = 0
    # fusion decoder
    dec_dim: int = 384
    dec_depth: int = 6
    dec_heads: int = 6
    dec_mlp_ratio: float = 4.0
    max_views: int = 1000  # size of the image-index embedding table
    # DPT heads
    hooks: list[int] = field(default_factory=lambda: [0, 3, 4, 6])
    dpt_layer_dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    dpt_feature_dim: int = 256
    dpt_last_dim: int = 128
    dpt_image_dim: int = 0  # > 0: the DPT heads see the image too (models.dpt, image branch)
    # > 0 (with dpt_image_dim): that image branch is a 4-stage conv pyramid with this many
    # residual conv units per stage (models.dpt)
    dpt_image_blocks: int = 0
    dpt_image_heads: str = "both"  # which DPT heads have the image branch: "both" | "local"
    # > 0 (with dpt_image_dim): those heads also see the pixels at the output size through two
    # 3x3 convs of this width (models.dpt, ``image_full``)
    dpt_image_full: int = 0
    # which DPT heads normalise in their residual conv units (GroupNorm): "none" | "local" | "both"
    dpt_norm: str = "none"
    global_head: str = "dpt"  # "dpt" (a second DPT head) | "pose" (models.pose_head)
    xyz_activation: str = "exp"
    conf_activation: str = "expp1"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field for an impossible architecture."""
        where = f"StudentConfig({self.name!r})"
        positive = ("patch_size", "img_size", "enc_dim", "enc_depth", "enc_heads", "dec_dim",
                    "dec_depth", "dec_heads", "max_views", "dpt_feature_dim", "dpt_last_dim")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"{where}: {key} must be positive, got {getattr(self, key)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"{where}: img_size {self.img_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        for dim, heads, part in ((self.enc_dim, self.enc_heads, "enc"),
                                 (self.dec_dim, self.dec_heads, "dec")):
            if dim % heads:
                raise ValueError(f"{where}: {part}_dim {dim} not divisible by {part}_heads {heads}")
        if self.dec_dim % 2:
            raise ValueError(f"{where}: dec_dim must be even (sin-cos index embedding)")
        if self.enc_reg_tokens < 0:
            raise ValueError(f"{where}: enc_reg_tokens must be >= 0")
        if self.dpt_image_dim < 0:
            raise ValueError(f"{where}: dpt_image_dim must be >= 0, got {self.dpt_image_dim}")
        if self.dpt_image_blocks < 0:
            raise ValueError(f"{where}: dpt_image_blocks must be >= 0, got {self.dpt_image_blocks}")
        if self.dpt_image_blocks and not self.dpt_image_dim:
            raise ValueError(f"{where}: dpt_image_blocks > 0 needs an image branch "
                             f"(dpt_image_dim > 0)")
        if self.dpt_image_full < 0:
            raise ValueError(f"{where}: dpt_image_full must be >= 0, got {self.dpt_image_full}")
        if self.dpt_image_full and not self.dpt_image_dim:
            raise ValueError(f"{where}: dpt_image_full > 0 needs an image branch "
                             f"(dpt_image_dim > 0)")
        if self.dpt_norm not in NORM_HEADS:
            raise ValueError(f"{where}: unknown dpt_norm {self.dpt_norm!r}; "
                             f"choose from {NORM_HEADS}")
        if self.dpt_image_heads not in IMAGE_HEADS:
            raise ValueError(f"{where}: unknown dpt_image_heads {self.dpt_image_heads!r}; "
                             f"choose from {IMAGE_HEADS}")
        if self.enc_stem_dim < 0:
            raise ValueError(f"{where}: enc_stem_dim must be >= 0, got {self.enc_stem_dim}")
        if self.enc_stem_dim and self.patch_size % 2:
            raise ValueError(f"{where}: a convolutional stem (enc_stem_dim > 0) needs an even "
                             f"patch_size, got {self.patch_size}")
        if self.enc_pos_embed not in ("learn", "none"):
            raise ValueError(f"{where}: enc_pos_embed must be 'learn' or 'none', "
                             f"got {self.enc_pos_embed!r}")
        hooks = list(self.hooks)
        if len(hooks) != 4 or hooks != sorted(set(hooks)) or hooks[0] < 0:
            raise ValueError(f"{where}: hooks must be 4 increasing indices >= 0, got {hooks}")
        if hooks[-1] != self.dec_depth:
            raise ValueError(f"{where}: the last hook must be the last decoder block "
                             f"({self.dec_depth}), got {hooks}")
        if len(self.dpt_layer_dims) != 4 or min(self.dpt_layer_dims) <= 0:
            raise ValueError(f"{where}: dpt_layer_dims must be 4 positive ints, "
                             f"got {self.dpt_layer_dims}")
        if self.global_head not in GLOBAL_HEADS:
            raise ValueError(f"{where}: unknown global_head {self.global_head!r}; "
                             f"choose from {GLOBAL_HEADS}")
        if self.xyz_activation not in XYZ_ACTIVATIONS:
            raise ValueError(f"{where}: unknown xyz_activation {self.xyz_activation!r}; "
                             f"choose from {XYZ_ACTIVATIONS}")
        if self.conf_activation not in CONF_ACTIVATIONS:
            raise ValueError(f"{where}: unknown conf_activation {self.conf_activation!r}; "
                             f"choose from {CONF_ACTIVATIONS}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (round-trips through :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StudentConfig":
        """Strict: unknown keys, missing ``name`` or wrong types raise ``ValueError``."""
        return _strict_from_dict(cls, values, "StudentConfig")


def _paper() -> StudentConfig:
    return StudentConfig(name="paper")


def _tiny() -> StudentConfig:
    return StudentConfig(
        name="tiny", patch_size=14, img_size=112,
        enc_dim=192, enc_depth=6, enc_heads=3, enc_reg_tokens=4, enc_layerscale=1.0,
        dec_dim=192, dec_depth=4, dec_heads=3, hooks=[0, 2, 3, 4],
        dpt_layer_dims=[32, 64, 128, 256], dpt_feature_dim=64, dpt_last_dim=32,
    )


def _tiny_lite() -> StudentConfig:
    return dataclasses.replace(_tiny(), name="tiny-lite", dpt_layer_dims=[16, 32, 64, 128],
                               dpt_feature_dim=32, dpt_last_dim=16)


def _tiny_fine() -> StudentConfig:
    return dataclasses.replace(_tiny_lite(), name="tiny-fine", patch_size=8)


def _tiny_pose() -> StudentConfig:
    return dataclasses.replace(_tiny_lite(), name="tiny-pose", global_head="pose")


def _tiny_conv() -> StudentConfig:
    return dataclasses.replace(_tiny_lite(), name="tiny-conv", enc_stem_dim=32)


def _tiny_skip() -> StudentConfig:
    return dataclasses.replace(_tiny_lite(), name="tiny-skip", dpt_image_dim=16)


def _tiny_hybrid() -> StudentConfig:
    return dataclasses.replace(_tiny_lite(), name="tiny-hybrid", enc_stem_dim=32, dpt_image_dim=16)


def _tiny_pyramid() -> StudentConfig:
    return dataclasses.replace(_tiny_hybrid(), name="tiny-pyramid", dpt_image_blocks=2)


def _tiny_pyramid_local() -> StudentConfig:
    return dataclasses.replace(_tiny_pyramid(), name="tiny-pyramid-local", dpt_image_heads="local")


def _tiny_pyramid_full() -> StudentConfig:
    return dataclasses.replace(_tiny_pyramid_local(), name="tiny-pyramid-full", dpt_image_full=16)


def _tiny_pyramid_gn() -> StudentConfig:
    return dataclasses.replace(_tiny_pyramid_local(), name="tiny-pyramid-gn", dpt_norm="local")


def _tiny_deep() -> StudentConfig:
    return dataclasses.replace(_tiny_pyramid_local(), name="tiny-deep", dec_depth=6,
                               hooks=[0, 3, 4, 6])


def _tiny_fine_pyramid() -> StudentConfig:
    return dataclasses.replace(_tiny_pyramid_local(), name="tiny-fine-pyramid", patch_size=8)


def _micro() -> StudentConfig:
    return StudentConfig(
        name="micro", patch_size=14, img_size=112,
        enc_dim=96, enc_depth=4, enc_heads=3, enc_reg_tokens=4, enc_layerscale=1.0,
        dec_dim=96, dec_depth=3, dec_heads=3, hooks=[0, 1, 2, 3],
        dpt_layer_dims=[16, 32, 64, 128], dpt_feature_dim=32, dpt_last_dim=16,
    )


def _fast3r_large() -> StudentConfig:
    return StudentConfig(
        name="fast3r-large", patch_size=16, img_size=512,
        enc_dim=1024, enc_depth=24, enc_heads=16, enc_class_token=False, enc_reg_tokens=0,
        enc_pos_embed="none", enc_layerscale=None,
        dec_dim=1024, dec_depth=24, dec_heads=16, hooks=[0, 12, 18, 24],
    )


_FACTORIES = {"paper": _paper, "tiny": _tiny, "tiny-lite": _tiny_lite, "tiny-fine": _tiny_fine,
              "tiny-pose": _tiny_pose, "tiny-conv": _tiny_conv,
              "tiny-skip": _tiny_skip, "tiny-hybrid": _tiny_hybrid, "tiny-pyramid": _tiny_pyramid,
              "tiny-pyramid-local": _tiny_pyramid_local, "tiny-pyramid-full": _tiny_pyramid_full,
              "tiny-pyramid-gn": _tiny_pyramid_gn,
              "tiny-deep": _tiny_deep,
              "tiny-fine-pyramid": _tiny_fine_pyramid,
              "micro": _micro,
              "fast3r-large": _fast3r_large}
MODEL_CONFIGS: dict[str, StudentConfig] = {name: make() for name, make in _FACTORIES.items()}


def get_config(name: str) -> StudentConfig:
    """A fresh copy of the named configuration (safe to modify)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown student config {name!r}; choose from {sorted(_FACTORIES)}")
    return _FACTORIES[name]()
