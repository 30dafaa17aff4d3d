"""DistillationLoss: zero at the target, scale invariance, sensitivity, degenerate inputs."""

import pytest
import torch

from distill3r.config import LossParams
from distill3r.losses import DistillationLoss

B, N, H, W = 2, 3, 6, 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _target(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xyz_local = torch.randn(B, N, H, W, 3, generator=g) + torch.tensor([0.0, 0.0, 4.0])
    return {
        "xyz_global": xyz_local + torch.randn(B, N, 1, 1, 3, generator=g),
        "xyz_local": xyz_local,
        "conf_global": 1 + 20 * torch.rand(B, N, H, W, generator=g),
        "conf_local": 1 + 20 * torch.rand(B, N, H, W, generator=g),
        "mask": torch.rand(B, N, H, W, generator=g) > 0.2,
    }


def _pred_from(target: dict, noise: float = 0.0, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pred = {}
    for key in ("xyz_global", "xyz_local", "conf_global", "conf_local"):
        value = target[key] + noise * torch.rand(target[key].shape, generator=g)
        pred[key] = value.clone().requires_grad_(True)
    return pred


@pytest.mark.parametrize("weighting", ["teacher", "none", "student"])
def test_zero_when_prediction_equals_target(weighting):
    target = _target()
    loss, details = DistillationLoss(LossParams(weighting=weighting))(_pred_from(target), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    assert set(details) >= {"loss", "loss_global", "loss_local", "loss_conf"}
    assert all(not v.requires_grad for v in details.values())


def test_total_is_weighted_sum_of_terms():
    params = LossParams(alpha_global=2.0, alpha_local=1.0, gamma_conf=0.5, alpha_camera=0.25)
    target = _target()
    loss, d = DistillationLoss(params)(_pred_from(target, noise=0.5), target)
    expected = (2.0 * d["loss_global"] + 1.0 * d["loss_local"] + 0.5 * d["loss_conf"]
                + 0.25 * d["loss_camera"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(d[k] > 0 for k in ("loss_global", "loss_local", "loss_conf", "loss_camera"))


def test_invariant_to_global_rescale_of_prediction():
    target = _target()
    pred = _pred_from(target, noise=0.3)
    loss_fn = DistillationLoss(LossParams())
    base, _ = loss_fn(pred, target)
    scaled = dict(pred, xyz_global=pred["xyz_global"] * 7.3, xyz_local=pred["xyz_local"] * 0.02)
    rescaled, _ = loss_fn(scaled, target)
    assert base.item() > 0
    assert rescaled.item() == pytest.approx(base.item(), rel=1e-4)


def test_global_scale_is_shared_by_views_local_is_not():
    target = _target()
    pred = _pred_from(target)
    loss_fn = DistillationLoss(LossParams())
    one_view = torch.ones(B, N, 1, 1, 1)
    one_view[:, 1] = 3.0  # rescale only view 1
    pred_s = dict(pred, xyz_global=pred["xyz_global"] * one_view,
                  xyz_local=pred["xyz_local"] * one_view)
    _, d = loss_fn(pred_s, target)
    assert d["loss_local"].item() == pytest.approx(0.0, abs=1e-6)  # per-view scale absorbs it (float32 rounding)
    assert d["loss_global"].item() > 1e-3  # a shared scale cannot


def test_changes_when_one_view_is_perturbed():
    target = _target()
    loss_fn = DistillationLoss(LossParams())
    pred = _pred_from(target, noise=0.1)
    base, _ = loss_fn(pred, target)
    moved = pred["xyz_local"].detach().clone()
    moved[0, 2] += 0.5
    perturbed, _ = loss_fn(dict(pred, xyz_local=moved), target)
    assert perturbed.item() != pytest.approx(base.item(), rel=1e-3)


def test_mask_is_used():
    target = _target()
    loss_fn = DistillationLoss(LossParams())
    pred = _pred_from(target)
    garbage = pred["xyz_global"].detach().clone()
    garbage[~target["mask"]] = float("nan")  # invalid pixels must not matter
    loss, _ = loss_fn(dict(pred, xyz_global=garbage), target)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def _assert_finite_with_grad(loss: torch.Tensor, pred: dict) -> None:
    assert torch.isfinite(loss)
    loss.backward()
    for key, value in pred.items():
        assert value.grad is not None, key
        assert torch.isfinite(value.grad).all(), key


def test_empty_mask_gives_zero_with_gradient_path():
    target = _target()
    target["mask"][:] = False
    pred = _pred_from(target, noise=0.5)
    loss, details = DistillationLoss(LossParams(weighting="student"))(pred, target)
    assert loss.item() == 0.0 and loss.requires_grad
    _assert_finite_with_grad(loss, pred)


def test_one_empty_view_is_ignored_in_the_average():
    target = _target()
    pred = _pred_from(target, noise=0.5)
    loss_fn = DistillationLoss(LossParams())
    _, full = loss_fn(pred, target)
    target["mask"][0, 1] = False
    loss, part = loss_fn(pred, target)
    assert torch.isfinite(loss) and part["loss_local"] > 0
    assert part["loss_local"].item() != pytest.approx(full["loss_local"].item(), rel=1e-6)


def test_zero_points_are_finite():
    target = _target()
    target["xyz_global"].zero_()
    target["xyz_local"][0].zero_()
    pred = _pred_from(target)
    pred["xyz_local"] = torch.zeros_like(pred["xyz_local"], requires_grad=True)
    loss, _ = DistillationLoss(LossParams())(pred, target)
    _assert_finite_with_grad(loss, pred)


def test_huge_and_infinite_confidences_are_finite():
    target = _target()
    target["conf_global"][0, 0] = 1e30
    target["conf_local"][1] = float("inf")
    pred = _pred_from(target, noise=0.2)
    with torch.no_grad():
        pred["conf_local"][0, 0] = 1e30
    loss, details = DistillationLoss(LossParams(weighting="student"))(pred, target)
    _assert_finite_with_grad(loss, pred)
    assert all(torch.isfinite(v) for v in details.values())


def test_bf16_inputs_under_autocast_computed_in_float32():
    target = _target()
    pred = {k: v.detach().bfloat16().requires_grad_(True)
            for k, v in _pred_from(target, noise=0.3).items()}
    target_bf16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in target.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = DistillationLoss(LossParams())(pred, target_bf16)
    assert loss.dtype == torch.float32
    _assert_finite_with_grad(loss, pred)


def test_rejects_bad_inputs_and_params():
    target = _target()
    pred = _pred_from(target)
    loss_fn = DistillationLoss(LossParams())
    with pytest.raises(ValueError, match="conf_local"):
        loss_fn({k: v for k, v in pred.items() if k != "conf_local"}, target)
    with pytest.raises(ValueError, match="xyz_global"):
        loss_fn(dict(pred, xyz_global=pred["xyz_global"][:, :1]), target)
    with pytest.raises(ValueError, match="weighting"):
        DistillationLoss(LossParams(weighting="teacherr"))


@pytest.mark.parametrize("distance", ["euclidean", "squared", "relative"])
def test_distance_is_the_per_pixel_error_norm(distance):
    # one view, all pixels valid, weight 1 (weighting none), prediction offset by a constant
    # vector in normalised units: the geometric term is |d| or |d|^2 exactly
    target = {k: v[:1, :1] for k, v in _target().items()}
    target["mask"] = torch.ones_like(target["mask"])
    s = torch.linalg.vector_norm(target["xyz_local"], dim=-1).mean()
    shift = torch.tensor([0.3, -0.4, 0.0]) * s  # |shift / s| = 0.5
    pred = _pred_from(target)
    pred["xyz_local"] = (target["xyz_local"] + shift).requires_grad_(True)
    _, d = DistillationLoss(LossParams(weighting="none", distance=distance))(pred, target)
    # the prediction's own scale moves too: compare against the exact normalised difference
    s_pred = torch.linalg.vector_norm(pred["xyz_local"].detach(), dim=-1).mean()
    diff = pred["xyz_local"].detach() / s_pred - target["xyz_local"] / s
    err = torch.linalg.vector_norm(diff, dim=-1)
    per_pixel = {"euclidean": err, "squared": err * err,
                 "relative": err / (torch.linalg.vector_norm(target["xyz_local"], dim=-1) / s)}
    want = per_pixel[distance].mean()
    assert d["loss_local"].item() == pytest.approx(want.item(), rel=1e-5)
    assert d["loss_local"].item() > 0.01


def test_relative_distance_counts_near_pixels_more_for_both_heads():
    """``relative``: the same normalised error costs more on a pixel near its camera than on a
    far one, in the global term too (divided by the pixel's local-map distance)."""
    target = {k: v[:1, :1].clone() for k, v in _target().items()}
    target["mask"] = torch.ones_like(target["mask"])
    dist = torch.linalg.vector_norm(target["xyz_local"][0, 0], dim=-1)
    near, far = divmod(int(dist.argmin()), dist.shape[1]), divmod(int(dist.argmax()), dist.shape[1])
    losses = {}
    for name, (y, x) in (("near", near), ("far", far)):
        for distance in ("euclidean", "relative"):
            pred = _pred_from(target)
            for key in ("xyz_global", "xyz_local"):
                moved = pred[key].clone()
                moved[0, 0, y, x] += 0.05 * dist.mean()
                pred[key] = moved
            _, d = DistillationLoss(LossParams(weighting="none", distance=distance))(pred, target)
            losses[name, distance] = d
    for head in ("loss_global", "loss_local"):
        ratio = {n: losses[n, "relative"][head] / losses[n, "euclidean"][head]
                 for n in ("near", "far")}
        assert ratio["near"] > 1.5 * ratio["far"], (head, ratio)


def test_euclidean_distance_has_finite_gradient_at_the_target():
    target = _target()
    pred = _pred_from(target)
    loss, _ = DistillationLoss(LossParams(distance="euclidean"))(pred, target)
    loss.backward()
    assert all(torch.isfinite(pred[k].grad).all() for k in ("xyz_global", "xyz_local"))


def _rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.linalg.det(q) > 0 else -q


def _rigid_target(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Maps of ``N`` cameras looking at random points: ``global = R_n local + c_n`` with view 0
    the identity (the global frame). Returns the target and the centres ``c`` ``[B,N,3]``."""
    g = torch.Generator().manual_seed(seed)
    local = torch.randn(B, N, H, W, 3, generator=g) + torch.tensor([0.0, 0.0, 4.0])
    rots = torch.stack([torch.stack([torch.eye(3) if n == 0 else _rotation(g) for n in range(N)])
                        for _ in range(B)])
    centres = torch.randn(B, N, 3, generator=g)
    centres[:, 0] = 0.0
    glob = torch.einsum("bnij,bnhwj->bnhwi", rots, local) + centres[:, :, None, None]
    target = {"xyz_global": glob, "xyz_local": local,
              "conf_global": torch.full((B, N, H, W), 5.0),
              "conf_local": torch.full((B, N, H, W), 5.0),
              "mask": torch.rand(B, N, H, W, generator=g) > 0.2}
    return target, centres


def _mean_norm(xyz: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(xyz, dim=-1)[mask].mean()


def test_camera_term_is_the_distance_between_normalised_camera_centres():
    """A view whose global map is its local map moved by the teacher's rotation and a wrong
    centre costs exactly the distance between the two normalised centres; a prediction in
    other units (local and global each rescaled) costs nothing."""
    target, centres = _rigid_target()
    loss_fn = DistillationLoss(LossParams(alpha_camera=1.0))
    pred = _pred_from(target)
    pred["xyz_global"] = (target["xyz_global"] * 3.0).requires_grad_(True)
    pred["xyz_local"] = (target["xyz_local"] * 0.5).requires_grad_(True)
    _, d = loss_fn(pred, target)
    assert d["loss_camera"].item() == pytest.approx(0.0, abs=1e-5)

    shift = torch.tensor([0.8, -0.3, 0.5])
    moved = target["xyz_global"].clone()
    moved[:, 1] += shift
    pred = _pred_from(target)
    pred["xyz_global"] = moved.requires_grad_(True)
    _, d = loss_fn(pred, target)
    want = []
    for b in range(B):
        mask = target["mask"][b]
        s_t, s_p = _mean_norm(target["xyz_global"][b], mask), _mean_norm(moved[b], mask)
        for n in range(N):
            c_pred = centres[b, n] + (shift if n == 1 else 0.0)
            want.append(torch.linalg.vector_norm(c_pred / s_p - centres[b, n] / s_t))
    assert d["loss_camera"].item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-4)
    assert d["loss_camera"].item() > 0.05


def test_camera_term_gradient_is_finite_on_planar_empty_and_sparse_views():
    target, _ = _rigid_target()
    target["xyz_local"][0, 1, ..., 2] = 4.0  # a flat wall facing the camera
    target["xyz_global"][0, 1] = target["xyz_local"][0, 1] + 1.0
    target["mask"][1, 2] = False
    pred = _pred_from(target, noise=0.3)
    loss, d = DistillationLoss(LossParams(alpha_camera=1.0))(pred, target)
    assert d["loss_camera"] > 0
    _assert_finite_with_grad(loss, pred)
    target["mask"][1, 2, 0, :3] = True  # 3 pixels: too few to place a camera (degenerate fit)
    pred = _pred_from(target, noise=0.3)
    loss, d = DistillationLoss(LossParams(alpha_camera=1.0))(pred, target)
    _assert_finite_with_grad(loss, pred)


def test_camera_term_moves_the_global_map_only():
    """The camera term's gradient reaches the global map, never the local one (which the local
    term alone trains)."""
    target, _ = _rigid_target()
    pred = _pred_from(target, noise=0.3)
    params = LossParams(alpha_global=0.0, alpha_local=0.0, gamma_conf=0.0, alpha_camera=1.0)
    loss, _ = DistillationLoss(params)(pred, target)
    loss.backward()
    assert pred["xyz_global"].grad.abs().sum() > 0
    assert pred["xyz_local"].grad is None or not pred["xyz_local"].grad.any()


@pytest.mark.parametrize("term", ["camera", "normal"])
def test_unweighted_terms_are_reported_without_autograd_only(term):
    """A term of weight 0 is left out of the total; validation and evaluation (no autograd)
    report it, training steps skip its cost."""
    target, _ = _rigid_target()
    pred = _pred_from(target, noise=0.3)
    loss, d = DistillationLoss(LossParams())(pred, target)
    want = 2.0 * d["loss_global"] + d["loss_local"] + 0.001 * d["loss_conf"]
    assert f"loss_{term}" not in d and loss.item() == want.item()
    with torch.no_grad():
        quiet, d = DistillationLoss(LossParams())(pred, target)
    assert d[f"loss_{term}"] > 0 and quiet.item() == want.item()
    loss, d = DistillationLoss(LossParams(**{f"alpha_{term}": 0.5}))(pred, target)
    assert loss.item() == pytest.approx((want + 0.5 * d[f"loss_{term}"]).item(), rel=1e-6)


def test_negative_camera_weight_is_refused():
    with pytest.raises(ValueError, match=r"alpha_camera.*must be >= 0"):
        DistillationLoss(LossParams(alpha_camera=-0.5))


def _plane(normal: torch.Tensor, height: int = 7, width: int = 8) -> torch.Tensor:
    """``[1,1,H,W,3]`` points of the plane through (0, 0, 4) with ``normal``, one per pixel
    ray of a pinhole camera (focal 10, centred)."""
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64) - height / 2,
                          torch.arange(width, dtype=torch.float64) - width / 2, indexing="ij")
    rays = torch.stack([u / 10, v / 10, torch.ones_like(u)], dim=-1)
    depth = 4.0 * normal[2] / (rays @ normal)
    return (rays * depth[..., None])[None, None].float()


def _local_only(pred_local: torch.Tensor, targ_local: torch.Tensor) -> tuple[dict, dict]:
    shape = targ_local.shape[:-1]
    target = {"xyz_global": targ_local, "xyz_local": targ_local,
              "conf_global": torch.full(shape, 20.0), "conf_local": torch.full(shape, 20.0),
              "mask": torch.ones(shape, dtype=torch.bool)}
    pred = dict(target, xyz_local=pred_local.clone().requires_grad_(True))
    return pred, target


def test_normal_term_is_one_minus_the_cosine_of_the_surface_angle():
    """A wall drawn tilted by 30 degrees costs 1 - cos(30 deg) at every interior pixel,
    whatever the prediction's scale; the right wall in other units costs nothing."""
    facing = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    angle = torch.tensor(30.0, dtype=torch.float64).deg2rad()
    tilted = torch.stack([torch.sin(angle), torch.tensor(0.0, dtype=torch.float64),
                          torch.cos(angle)])
    loss_fn = DistillationLoss(LossParams(alpha_normal=1.0))
    _, d = loss_fn(*_local_only(_plane(tilted) * 3.0, _plane(facing)))
    assert d["loss_normal"].item() == pytest.approx(1 - torch.cos(angle).item(), rel=1e-4)
    _, d = loss_fn(*_local_only(_plane(facing) * 0.2, _plane(facing)))
    assert d["loss_normal"].item() == pytest.approx(0.0, abs=1e-6)


def test_normal_term_ignores_pixels_next_to_invalid_ones_and_weights_by_confidence():
    facing = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    flipped = _plane(facing)
    flipped[..., 2] = 8.0 - flipped[..., 2]  # the same wall with a bump: other normals
    flipped[:, :, 3, 4, 2] += 1.5
    pred, target = _local_only(flipped, _plane(facing))
    loss_fn = DistillationLoss(LossParams(alpha_normal=1.0, conf_scale=10.0, w_min=0.1))
    _, d = loss_fn(pred, target)
    assert d["loss_normal"] > 0.05
    target["mask"][:, :, 3, 4] = False  # the bump and its four neighbours' normals drop out
    _, d = loss_fn(pred, target)
    assert d["loss_normal"].item() == pytest.approx(0.0, abs=1e-6)
    target["mask"][:, :, 3, 4] = True
    _, full = loss_fn(pred, target)
    target["conf_local"] = torch.full_like(target["conf_local"], 5.0)  # weight 0.5 everywhere
    _, half = loss_fn(pred, target)
    assert half["loss_normal"].item() == pytest.approx(0.5 * full["loss_normal"].item(), rel=1e-5)


def test_normal_term_gradient_is_bounded_on_a_collapsed_prediction():
    """A student map shrunk to (almost) one point has (almost) no normals: it costs about 1,
    and the floor on their length keeps the gradient small instead of ``1 / length``."""
    facing = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    tilted = torch.tensor([0.5, 0.0, 0.866], dtype=torch.float64)
    target_local = _plane(facing)
    shape = _plane(tilted)
    centre = shape[:, :, 3:4, 4:5]
    pred, target = _local_only(centre + 1e-4 * (shape - centre), target_local)
    loss, d = DistillationLoss(LossParams(alpha_global=0.0, alpha_local=0.0, gamma_conf=0.0,
                                          alpha_normal=1.0))(pred, target)
    loss.backward()
    grad = pred["xyz_local"].grad
    assert torch.isfinite(grad).all() and 0 < grad.abs().max() < 10
    assert d["loss_normal"].item() == pytest.approx(1.0, abs=0.01)


def test_negative_normal_weight_is_refused():
    with pytest.raises(ValueError, match=r"alpha_normal.*must be >= 0"):
        DistillationLoss(LossParams(alpha_normal=-1.0))
