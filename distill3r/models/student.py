"""The student: encoder -> fusion decoder -> global and local DPT heads.

Shapes: images ``[B, N, 3, H, W]`` float in [0, 1], ``H`` and ``W`` multiples of
``config.patch_size`` (portrait or landscape, any ``N >= 1``). Outputs (float32, OpenCV camera
axes x right, y down, z forward):

- ``xyz_global`` ``[B, N, H, W, 3]``: points in view 0's camera frame;
- ``conf_global`` ``[B, N, H, W]``: confidence >= 1;
- ``xyz_local`` ``[B, N, H, W, 3]``: points in each view's own camera frame;
- ``conf_local`` ``[B, N, H, W]``.

The global head is a DPT head (``config.global_head == "dpt"``, the published student) or a
:class:`~distill3r.models.pose_head.PoseHead` (``"pose"``): then ``xyz_global`` is the local
map moved by a predicted per-view similarity and ``conf_global`` equals ``conf_local``.

In ``train()`` mode views 1..N-1 get random sorted image indices from torch's global generator
(seed it for reproducible runs); in ``eval()`` mode indices are 0..N-1 (deterministic).
The encoder runs on all views folded into the batch (shared weights). Without autograd
(evaluation, inference) the heads run over the ``B*N`` views in chunks of ``head_chunk_size``
and write into preallocated outputs, which bounds activation memory. While autograd records
they run on all views at once: backward keeps every chunk's activations anyway, so chunks would
save no memory and cost time (a tiny-pyramid-local training step on the CPU: 5% faster than in
chunks of 8). Nothing is tied to a device.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from distill3r.models.activations import get_activation
from distill3r.models.configs import StudentConfig, get_config
from distill3r.models.decoder import FusionDecoder
from distill3r.models.dpt import DPTHead
from distill3r.models.dune import load_dune_encoder
from distill3r.models.encoder import Encoder
from distill3r.models.pose_head import PoseHead

log = logging.getLogger(__name__)


class Student(nn.Module):
    def __init__(self, config: StudentConfig, head_chunk_size: int = 8) -> None:
        super().__init__()
        if head_chunk_size < 1:
            raise ValueError(f"head_chunk_size must be >= 1, got {head_chunk_size}")
        config.validate()
        self.config = config
        self.head_chunk_size = head_chunk_size
        self.encoder = Encoder(config)
        self.decoder = FusionDecoder(config.enc_dim, config.dec_dim, config.dec_depth,
                                     config.dec_heads, config.dec_mlp_ratio, config.max_views)
        in_dims = [config.enc_dim if k == 0 else config.dec_dim for k in config.hooks]
        head_args = (in_dims, list(config.dpt_layer_dims), config.dpt_feature_dim,
                     config.dpt_last_dim, 4)
        image = (config.dpt_image_dim, config.dpt_image_blocks, config.dpt_image_full)
        global_image = image if config.dpt_image_heads == "both" else (0, 0, 0)
        self.head_global = (DPTHead(*head_args, *global_image, norm=config.dpt_norm == "both")
                            if config.global_head == "dpt" else PoseHead(config.dec_dim))
        self.head_local = DPTHead(*head_args, *image, norm=config.dpt_norm != "none")
        self.xyz_act = get_activation("xyz", config.xyz_activation)
        self.conf_act = get_activation("conf", config.conf_activation)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def _check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, N, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of the patch size "
                             f"{self.patch_size}")
        if images.shape[0] == 0 or images.shape[1] == 0:
            raise ValueError(f"empty batch or no views: {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(images)
        b, n, _, height, width = images.shape
        grid = (height // self.patch_size, width // self.patch_size)
        views = images.reshape(b * n, 3, height, width)
        enc = self.encoder(views)  # [B*N, P, Ce]
        dec_blocks = [k for k in self.config.hooks if k > 0]
        dec = self.decoder(enc.view(b, n, enc.shape[1], enc.shape[2]), dec_blocks)
        dec_iter = iter(dec)
        feats = [enc if k == 0 else next(dec_iter).flatten(0, 1) for k in self.config.hooks]
        reference = torch.arange(b * n, device=images.device) % n == 0
        maps = self.run_heads(feats, grid, (height, width), reference, views)
        return {k: v.view(b, n, *v.shape[1:]) for k, v in maps.items()}

    def forward_stream(self, images, device: torch.device, dtype: torch.dtype, sink,
                       view_chunk: int = 8, token_chunk: int = 8192) -> None:
        """One scene's views ``[N,H,W,3]`` uint8 in bounded memory, the maps handed to
        ``sink(start, maps)`` per view chunk: :func:`distill3r.models.streaming.stream_forward`."""
        from distill3r.models.streaming import stream_forward  # lazy: streaming imports the models

        stream_forward(self, images, device, dtype, sink, view_chunk, token_chunk)

    def run_heads(self, feats: list[torch.Tensor], grid: tuple[int, int],
                  size: tuple[int, int], reference: Optional[torch.Tensor] = None,
                  images: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Both heads on hooked tokens ``feats`` (4 x ``[V, P, C_k]``) -> float32
        ``xyz_global, xyz_local [V,H,W,3]``, ``conf_global, conf_local [V,H,W]``.
        ``reference`` bool ``[V]`` marks each sample's view 0 (needed by a pose head only);
        ``images`` ``[V,3,H,W]`` in [0, 1] (needed by heads with an image branch only)."""
        pose = isinstance(self.head_global, PoseHead)
        if pose and (reference is None or reference.shape != (feats[-1].shape[0],)):
            raise ValueError("a pose global head needs reference [V]: which views are view 0 "
                             "of their sample")
        if not pose:
            out = {}
            for name, head in (("global", self.head_global), ("local", self.head_local)):
                out[f"xyz_{name}"], out[f"conf_{name}"] = self._run_head(head, feats, grid, size,
                                                                         images)
            return out
        xyz_local, conf_local = self._run_head(self.head_local, feats, grid, size, images)
        rot, trans, scale = self.head_global(feats[-1], reference)
        return {"xyz_global": PoseHead.compose(xyz_local, rot, trans, scale),
                "conf_global": conf_local.clone(), "xyz_local": xyz_local,
                "conf_local": conf_local}

    def _run_head(self, head: DPTHead, feats: list[torch.Tensor], grid: tuple[int, int],
                  size: tuple[int, int], images: Optional[torch.Tensor] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``head`` over the ``V = B*N`` views in chunks -> ``[V,H,W,3]``, ``[V,H,W]``."""
        views, device = feats[0].shape[0], feats[0].device
        xyz = torch.empty(views, *size, 3, dtype=torch.float32, device=device)
        conf = torch.empty(views, *size, dtype=torch.float32, device=device)
        recording = torch.is_grad_enabled() and (
            feats[-1].requires_grad or any(p.requires_grad for p in head.parameters()))
        chunk_size = views if recording else self.head_chunk_size
        for start in range(0, views, chunk_size):
            stop = min(start + chunk_size, views)
            chunk = None if images is None else images[start:stop]
            raw = head([f[start:stop] for f in feats], grid, size, chunk)
            raw = raw.float().permute(0, 2, 3, 1)
            xyz[start:stop] = self.xyz_act(raw[..., :3])
            conf[start:stop] = self.conf_act(raw[..., 3])
        return xyz, conf


def count_parameters(model: Student) -> dict[str, int]:
    """Parameter counts: encoder, decoder, head_global, head_local and total."""
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("encoder", "decoder", "head_global", "head_local")}
    parts["total"] = sum(p.numel() for p in model.parameters())
    return parts


def build_student(name: str, encoder_weights: Optional[str] = None,
                  head_chunk_size: int = 8) -> Student:
    """The named student (see ``MODEL_CONFIGS``). ``encoder_weights``: a DUNE checkpoint loaded
    strictly into the encoder, or ``None`` for random initialisation (logged as a warning)."""
    config = get_config(name)
    if encoder_weights is not None and config.enc_stem_dim:
        raise ValueError(f"model {name!r} embeds patches with a convolutional stem "
                         f"(enc_stem_dim {config.enc_stem_dim}): DUNE encoder weights "
                         f"({encoder_weights}) need the ViT's patch embedding; choose a model "
                         f"without a stem or drop model.encoder_weights")
    model = Student(config, head_chunk_size=head_chunk_size)
    if encoder_weights is not None:
        load_dune_encoder(model.encoder.vit, encoder_weights)
        log.info("student %s: encoder initialised from %s", name, encoder_weights)
    else:
        log.warning("student %s: no encoder weights given, encoder starts from random init", name)
    return model
