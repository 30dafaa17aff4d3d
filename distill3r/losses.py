"""Confidence-aware distillation loss (the published recipe, with its defects fixed).

``L = alpha_global * L_global + alpha_local * L_local + gamma_conf * L_conf
+ alpha_camera * L_camera + alpha_normal * L_normal``

Inputs (``B`` samples, ``N`` views, float32 or bf16; computed in float32 with autocast off):
pred = the student output dict, target = ``xyz_global``, ``xyz_local`` ``[B,N,H,W,3]``,
``conf_global``, ``conf_local`` ``[B,N,H,W]`` (teacher, >= 1) and ``mask`` bool ``[B,N,H,W]``.

- Normalisation: prediction and target are each divided by their own mean distance to the
  origin over valid pixels. Global: one scale per sample shared by all N views (relative view
  placement matters); local: one scale per view. So the loss is invariant to a rescaling of
  the prediction.
- Geometric term of one view: ``sum_valid w * d(p_hat/s_hat, p/s) / N_valid`` with
  ``d = ||.||`` (``distance="euclidean"``: DUSt3R's and Fast3R's ``L21Loss``, naver/dust3r
  ``dust3r/losses.py``), ``||.||^2`` (``"squared"``) or ``||.|| / r`` (``"relative"``) with
  ``r = max(||p_local|| / s_local, 0.05)`` the pixel's distance to its own camera in the
  teacher's normalised local map (mean 1 per view): the error relative to how far the
  pixel is, as depth AbsRel measures it, so near objects count as much as far walls; and
  ``w = clamp(conf_teacher / conf_scale, w_min, 1)`` (``weighting="teacher"``), ``1``
  (``"none"``) or ``clamp(conf_student.detach() / conf_scale, w_min, 1)`` (``"student"``).
  ``L_global`` / ``L_local`` = mean over all (sample, view) pairs that have a valid pixel.
- ``L_conf``: L1 between ``log(conf_student)`` and ``log(conf_teacher)`` on valid pixels
  (per-view mean, then mean over views with valid pixels), averaged over the global and local
  heads. The log keeps the term bounded (confidences live in [1, ~1e4]; the published L1 on raw
  ``1 + exp`` values was unbounded); confidences are clamped to [1, float32 max] first so an
  infinite teacher confidence gives a finite loss.
- ``L_camera``: where each view's camera lands in the sample's global frame. A view's two maps
  imply its camera: the global points are its local points moved by a similarity,
  ``G = k R L + c``, and ``c`` (where the local origin lands) is the camera centre in view
  0's frame. For the teacher (normalised maps, valid pixels, no gradient) ``k, R, c`` are the
  Umeyama fit (least-squares similarity, Umeyama 1991). For the student, ``R`` is the
  teacher's and ``k``, ``c`` are the student's own least-squares fit of its normalised maps,
  ``c = mean(G) - k R mean(L)``: closed form, defined on a planar view. The gradient flows
  through ``mean(G)`` only: the term moves a view's global map as a whole and leaves the
  local map to the local term (with a gradient through ``k`` and the local map, a nearly
  constant local map early in training makes ``k`` explode and the term wrecked the local
  head: demo local loss 1.83 instead of 0.13 at step 600). The term is
  ``||c_student - c_teacher||`` averaged over the (sample, view) pairs with at least
  ``_MIN_CAMERA_PIXELS`` valid pixels. The point terms weigh a shift of a
  whole view's global map like the same amount of per-pixel noise; poses, and above all the
  direction of the translation between nearby views, depend only on the shift, which this
  term measures directly. With ``alpha_camera: 0`` it is left out of the total and computed
  only without autograd (validation, evaluation), for the report.
- ``L_normal``: the surface orientation of the local map. A pixel's normal is the cross
  product of its horizontal and vertical central differences (the normals the evaluation's
  normal consistency compares); the term is ``1 - cos`` between the student's and the
  teacher's unit normals, weighted like the point terms, on the pixels whose four neighbours
  are valid (per-view mean, then mean over views). The point terms weigh a pixel's error,
  not its neighbour's: a surface drawn with the right depth but the wrong slope costs them
  little. Like ``L_camera``, with ``alpha_normal: 0`` it is computed only without autograd,
  for the report.
- Invalid pixels are replaced (``torch.where``) before any arithmetic, so NaN/inf there never
  reaches the loss or its gradient. An empty mask gives a loss of exactly 0 that still depends
  on the prediction (zero gradient, no NaN).
"""

from __future__ import annotations

import torch
from torch import nn

from distill3r.config import LossParams
from distill3r.models.activations import point_norm

_MIN_SCALE = 1e-6
_MIN_CAMERA_PIXELS = 16  # fewer valid pixels leave a view out of L_camera
_MIN_RELATIVE = 0.05  # "relative" distance: pixels nearer than 5% of their view's mean distance
_NORMAL_FLOOR = 0.1  # L_normal: the student's normal length counts as at least 0.1x the teacher's
_FMAX = torch.finfo(torch.float32).max
_KEYS_PRED = ("xyz_global", "xyz_local", "conf_global", "conf_local")


def _masked_view_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``values``, ``valid`` ``[B,N,H,W]`` -> scalar: per-view mean over valid pixels, then mean
    over the views that have any valid pixel (0 when none has, still attached to the graph)."""
    count = valid.sum(dim=(2, 3))
    per_view = torch.where(valid, values, 0.0).sum(dim=(2, 3)) / count.clamp_min(1)
    has = (count > 0).to(per_view.dtype)
    return (per_view * has).sum() / has.sum().clamp_min(1)


def _mean_norm(xyz: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean distance to the origin over the valid pixels (``v`` 0/1 ``[B,N,H,W]``) of ``dims``."""
    count = v.sum(dim=dims, keepdim=True).clamp_min(1)
    return ((point_norm(xyz).squeeze(-1) * v).sum(dim=dims, keepdim=True) / count).clamp_min(_MIN_SCALE)


def _normalised(xyz: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``xyz`` over its mean distance to the origin (:func:`_mean_norm`): ``dims`` ``(1, 2, 3)``
    one scale per sample (global maps), ``(2, 3)`` one per view (local maps)."""
    return xyz / _mean_norm(xyz, v, dims)[..., None]


def _geometric(pred: torch.Tensor, targ: torch.Tensor, valid: torch.Tensor,
               weight: torch.Tensor, squared: bool,
               divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted point error between normalised maps (:func:`_normalised`), squared or
    Euclidean, divided per pixel by ``divisor`` ``[B,N,H,W]`` when given."""
    diff = pred - targ
    # vector_norm's gradient at a zero difference is 0, not NaN
    dist = (diff * diff).sum(-1) if squared else torch.linalg.vector_norm(diff, dim=-1)
    if divisor is not None:
        dist = dist / divisor
    return _masked_view_mean(weight * dist, valid)


def _centred(xyz: torch.Tensor, v: torch.Tensor, count: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view mean ``[B,N,3]`` over the valid pixels and the points minus it (0 where
    invalid) ``[B,N,H,W,3]``."""
    mean = (xyz * v[..., None]).sum(dim=(2, 3)) / count[..., None]
    return mean, (xyz - mean[:, :, None, None]) * v[..., None]


def _camera_error(p_global: torch.Tensor, p_local: torch.Tensor, t_global: torch.Tensor,
                  t_local: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``L_camera`` (module doc): normalised maps (:func:`_normalised`) ``[B,N,H,W,3]`` float32
    (0 where invalid) and ``valid`` ``[B,N,H,W]``; returns a scalar."""
    v = valid.to(p_global.dtype)
    count = v.sum(dim=(2, 3))
    used = count >= _MIN_CAMERA_PIXELS
    count = count.clamp_min(1)
    with torch.no_grad():
        mg, yg = _centred(t_global, v, count)
        ml, xl = _centred(t_local, v, count)
        cov = torch.einsum("bnhwi,bnhwj->bnij", yg, xl) / count[..., None, None]
        u, sig, vh = torch.linalg.svd(cov)
        flip = torch.ones_like(sig)
        flip[..., 2] = torch.sign(torch.linalg.det(u @ vh))
        rot = u @ torch.diag_embed(flip) @ vh
        var = (xl * xl).sum(dim=(2, 3, 4)) / count
        scale = (sig * flip).sum(-1) / var.clamp_min(_MIN_SCALE)
        c_teacher = mg - scale[..., None] * torch.einsum("bnij,bnj->bni", rot, ml)
    pg, yp = _centred(p_global, v, count)
    with torch.no_grad():
        pl, xp = _centred(p_local, v, count)
        xp_rot = torch.einsum("bnij,bnhwj->bnhwi", rot, xp)
        k = (yp * xp_rot).sum(dim=(2, 3, 4)) / (xp * xp).sum(dim=(2, 3, 4)).clamp_min(_MIN_SCALE)
        offset = k[..., None] * torch.einsum("bnij,bnj->bni", rot, pl)
    c_student = pg - offset
    err = torch.linalg.vector_norm(c_student - c_teacher, dim=-1)
    return torch.where(used, err, 0.0).sum() / used.sum().clamp_min(1)


def _grid_normals(xyz: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals ``[B,N,H-2,W-2,3]`` (not unit: the cross product of the horizontal and vertical
    central differences) of the interior pixels of ``xyz`` ``[B,N,H,W,3]``, and where they are
    defined (``valid`` ``[B,N,H,W]`` at the pixel and its four neighbours)."""
    dx = xyz[:, :, 1:-1, 2:] - xyz[:, :, 1:-1, :-2]
    dy = xyz[:, :, 2:, 1:-1] - xyz[:, :, :-2, 1:-1]
    ok = (valid[:, :, 1:-1, 1:-1] & valid[:, :, 1:-1, 2:] & valid[:, :, 1:-1, :-2]
          & valid[:, :, 2:, 1:-1] & valid[:, :, :-2, 1:-1])
    return torch.linalg.cross(dx, dy, dim=-1), ok


def _normal_error(pred: torch.Tensor, targ: torch.Tensor, valid: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor:
    """``L_normal`` (module doc) of normalised local maps ``[B,N,H,W,3]`` with per-pixel
    ``weight`` and ``valid`` ``[B,N,H,W]``; a scalar (0 for maps smaller than 3x3).

    The student's normal is divided by its length, but by no less than a tenth of the
    teacher's: ``cos`` has a gradient of ``1 / length``, and a student surface that
    collapses to a line or a point at one pixel would otherwise blow up the step."""
    if pred.shape[2] < 3 or pred.shape[3] < 3:
        return pred.sum() * 0.0
    n_pred, ok = _grid_normals(pred, valid)
    n_targ, _ = _grid_normals(targ, valid)
    len_targ = torch.linalg.vector_norm(n_targ, dim=-1)
    ok = ok & (len_targ > _MIN_SCALE ** 2)  # a degenerate teacher normal says nothing
    len_targ = len_targ.clamp_min(_MIN_SCALE ** 2)
    len_pred = torch.maximum(point_norm(n_pred, eps=_MIN_SCALE ** 4).squeeze(-1),
                             _NORMAL_FLOOR * len_targ)
    cos = (n_pred * n_targ).sum(-1) / (len_pred * len_targ)
    return _masked_view_mean(weight[:, :, 1:-1, 1:-1] * (1.0 - cos), ok)


def _log_conf(conf: torch.Tensor) -> torch.Tensor:
    return conf.clamp(1.0, _FMAX).log()


class DistillationLoss(nn.Module):
    """``loss, details = DistillationLoss(params)(pred, target)``; ``details`` holds detached
    ``loss`` (weighted total), ``loss_global``, ``loss_local``, ``loss_conf``,
    ``loss_conf_global``, ``loss_conf_local``, and ``loss_camera`` and ``loss_normal`` where
    their weight is positive or autograd is off (module doc)."""

    def __init__(self, params: LossParams) -> None:
        super().__init__()
        params.validate("loss")
        self.params = params

    def _weight(self, teacher_conf: torch.Tensor, student_conf: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.weighting == "none":
            return torch.ones_like(teacher_conf)
        conf = teacher_conf if p.weighting == "teacher" else student_conf.detach()
        return (conf / p.conf_scale).clamp(p.w_min, 1.0)

    def forward(self, pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_inputs(pred, target)
        with torch.autocast(device_type=target["mask"].device.type, enabled=False):
            valid = target["mask"].bool()
            vp = valid[..., None]
            v = valid.float()
            terms = {}
            maps = {}  # (head, "pred"/"target") -> normalised map, 0 where invalid
            for head in ("global", "local"):
                # global: one scale per sample (relative view placement matters); local: per view
                dims = (1, 2, 3) if head == "global" else (2, 3)
                for side, d in (("pred", pred), ("target", target)):
                    maps[head, side] = _normalised(
                        torch.where(vp, d[f"xyz_{head}"].float(), 0.0), v, dims)
            divisor, weights = None, {}
            if self.params.distance == "relative":
                # each pixel's distance to its own camera over its view's mean distance (the
                # teacher's normalised local map), at least _MIN_RELATIVE
                divisor = point_norm(maps["local", "target"]).squeeze(-1).clamp_min(_MIN_RELATIVE)
            for head in ("global", "local"):
                p_conf = torch.where(valid, pred[f"conf_{head}"].float(), 1.0)
                t_conf = torch.where(valid, target[f"conf_{head}"].float(), 1.0)
                weights[head] = weight = self._weight(t_conf, p_conf)
                terms[f"loss_{head}"] = _geometric(
                    maps[head, "pred"], maps[head, "target"], valid, weight,
                    squared=self.params.distance == "squared", divisor=divisor)
                err = (_log_conf(p_conf) - _log_conf(t_conf)).abs()
                terms[f"loss_conf_{head}"] = _masked_view_mean(err, valid)
            terms["loss_conf"] = 0.5 * (terms["loss_conf_global"] + terms["loss_conf_local"])
            p = self.params
            # a term without weight is only reported, and only where autograd is off
            # (validation, evaluation): training steps skip its cost, and the total is bit for
            # bit the loss without it
            recording = torch.is_grad_enabled()
            if p.alpha_camera > 0 or not recording:
                terms["loss_camera"] = _camera_error(
                    *(maps[head, side] for side in ("pred", "target")
                      for head in ("global", "local")), valid)
            if p.alpha_normal > 0 or not recording:
                terms["loss_normal"] = _normal_error(maps["local", "pred"],
                                                     maps["local", "target"], valid,
                                                     weights["local"])
            loss = (p.alpha_global * terms["loss_global"] + p.alpha_local * terms["loss_local"]
                    + p.gamma_conf * terms["loss_conf"])
            if p.alpha_camera > 0:
                loss = loss + p.alpha_camera * terms["loss_camera"]
            if p.alpha_normal > 0:
                loss = loss + p.alpha_normal * terms["loss_normal"]
        details = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        return loss, details


def _check_inputs(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    for key in _KEYS_PRED:
        if key not in pred:
            raise ValueError(f"prediction is missing {key!r}")
    for key in _KEYS_PRED + ("mask",):
        if key not in target:
            raise ValueError(f"target is missing {key!r}")
    mask_shape = tuple(target["mask"].shape)
    if len(mask_shape) != 4:
        raise ValueError(f"target['mask'] must be [B,N,H,W], got {mask_shape}")
    for source, d in (("prediction", pred), ("target", target)):
        for key in _KEYS_PRED:
            want = mask_shape + ((3,) if key.startswith("xyz") else ())
            if tuple(d[key].shape) != want:
                raise ValueError(f"{source}[{key!r}] has shape {tuple(d[key].shape)}, "
                                 f"expected {want}")
