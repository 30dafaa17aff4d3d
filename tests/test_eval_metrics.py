"""Depth / reconstruction metrics, alignment, baselines and the per-sample protocol."""

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from distill3r.evaluation import (aggregate_metrics, align_to_reference, cloud_metrics,
                                  depth_metrics, evaluate_sample, fit_layout_prior, grid_normals,
                                  layout_baseline, median_depth_scale, plane_baseline,
                                  point_map_metrics, subsample_indices, top_confident)
from distill3r.geometry import similarity_matrix, transform_points
from synthetic import synthetic_scene


@pytest.fixture(scope="module")
def scene():
    return synthetic_scene(num_views=3, height=24, width=32, seed=4)


def _prediction(scene, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    shape = scene["depth"].shape
    conf = 1.0 + rng.uniform(0, 5, size=shape)
    return {"xyz_global": scene["xyz_global"] + noise * rng.standard_normal(shape + (3,)),
            "xyz_local": scene["xyz_local"] + noise * rng.standard_normal(shape + (3,)),
            "conf_global": conf, "conf_local": conf[::-1].copy()}


# --- hand-computed small cases -----------------------------------------------------------------
def test_cloud_metrics_match_hand_computed_values():
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], float)
    pred = np.array([[0, 0, 0.1], [1, 0, 0.2], [0, 1, 0.3], [3, 1, 0]], float)
    m = cloud_metrics(pred, ref)
    assert m["acc_mean"] == pytest.approx((0.1 + 0.2 + 0.3 + 2.0) / 4)
    assert m["acc_median"] == pytest.approx(0.25)
    # ref (1,1,0) is nearest to pred (1,0,0.2): sqrt(1.04)
    comp = [0.1, 0.2, 0.3, math.sqrt(1.04)]
    assert m["comp_mean"] == pytest.approx(np.mean(comp))
    assert m["comp_median"] == pytest.approx(0.25)
    assert m["chamfer"] == pytest.approx((m["acc_mean"] + m["comp_mean"]) / 2)


def test_depth_metrics_match_hand_computed_values():
    pred = np.array([[[1.0, 2.0, 4.0, 7.0]]])
    ref = np.array([[[2.0, 4.0, 6.0, 0.0]]])  # last pixel invalid
    m = depth_metrics(pred, ref)
    # scale = median(ref)/median(pred) = 4/2 -> pred [2, 4, 8]
    assert m["abs_rel"] == pytest.approx((0 + 0 + 2 / 6) / 3)
    assert m["delta1"] == pytest.approx(2 / 3)
    # negative predictions are failures, not successes
    assert depth_metrics(np.array([[[1.0, 1.0, -1.0]]]), np.ones((1, 1, 3)))["delta1"] \
        == pytest.approx(2 / 3)


def test_normal_consistency_of_tilted_planes_is_cos_angle():
    v, u = np.mgrid[0:8, 0:8].astype(float)
    flat = np.stack([u, v, np.full_like(u, 5.0)], -1)[None]
    theta = np.radians(30)
    tilted = flat.copy()
    tilted[..., 2] = 5.0 + u * np.tan(theta)
    n, ok = grid_normals(flat)
    assert ok[0, 1:-1, 1:-1].all() and not ok[0, 0].any()
    assert np.allclose(np.abs(n[0, 1:-1, 1:-1, 2]), 1.0)
    m = point_map_metrics(tilted, flat, np.ones((1, 8, 8), bool), normals=True)
    assert m["nc"] == pytest.approx(math.cos(theta))


def test_median_scale_top_confident_and_subsample():
    pred = np.array([[[1.0, 2.0, 3.0]], [[1.0, 1.0, 1.0]]])
    ref = 2.5 * pred
    valid = np.ones(pred.shape, bool)
    valid[1] = False
    s = median_depth_scale(pred, ref, valid)
    assert s[0] == pytest.approx(2.5) and math.isnan(s[1])
    conf = np.arange(100.0).reshape(4, 5, 5)
    sel = top_confident(conf, np.ones_like(conf, bool), 0.15)
    assert sel.sum() == 15 and conf[sel].min() == 85
    assert np.array_equal(subsample_indices(1000, 50, 3), subsample_indices(1000, 50, 3))
    assert not np.array_equal(subsample_indices(1000, 50, 3), subsample_indices(1000, 50, 4))


def test_alignment_recovers_a_similarity(scene):
    T = similarity_matrix(0.4, Rotation.from_euler("xyz", [10, -40, 70], degrees=True)
                          .as_matrix(), np.array([0.3, 2.0, -1.0]))
    pred = transform_points(np.linalg.inv(T), scene["xyz_global"])
    conf = np.ones(scene["depth"].shape)
    aligned, T_fit = align_to_reference(pred, scene["xyz_global"], conf, scene["valid"])
    assert np.allclose(T_fit, T, atol=1e-8)
    assert np.allclose(aligned, scene["xyz_global"], atol=1e-8)


# --- the protocol -------------------------------------------------------------------------------
def test_ground_truth_against_itself_is_perfect(scene):
    m = evaluate_sample(_prediction(scene), scene)
    assert m["depth_abs_rel"] == pytest.approx(0, abs=1e-12)
    assert m["depth_delta1"] == 1.0
    for k in ("acc_mean", "acc_median", "comp_mean", "comp_median", "chamfer",
              "global_head_chamfer", "focal_rel_err"):
        assert m[k] == pytest.approx(0, abs=1e-9), k
    assert m["nc"] == pytest.approx(1.0)
    for method in ("pnp", "procrustes"):
        assert m[f"{method}_rot_err"] < 1e-3 and m[f"{method}_trans_err"] < 1e-3
        for k in ("rra_5", "rra_15", "rta_5", "rta_15", "maa_30"):
            assert m[f"{method}_{k}"] == 1.0
    assert m["pnp_failed_views"] == 0


def test_teacher_reference_against_itself_is_perfect(scene):
    ref = {"xyz_global": scene["xyz_global"], "xyz_local": scene["xyz_local"],
           "mask": scene["valid"]}
    m = evaluate_sample(_prediction(scene), ref)
    assert m["chamfer"] == pytest.approx(0, abs=1e-9)
    assert m["procrustes_maa_30"] == 1.0 and "focal_rel_err" not in m


def test_metrics_invariant_to_a_similarity_of_the_prediction(scene):
    pred = _prediction(scene, noise=0.02, seed=1)
    T = similarity_matrix(3.7, Rotation.random(random_state=5).as_matrix(),
                          np.array([1.0, -2.0, 5.0]))
    moved = dict(pred, xyz_global=transform_points(T, pred["xyz_global"]),
                 xyz_local=0.3 * pred["xyz_local"])
    a, b = evaluate_sample(pred, scene), evaluate_sample(moved, scene)
    assert a["chamfer"] > 1e-3  # the noise is visible, so equality below means something
    for k in ("depth_abs_rel", "depth_delta1", "acc_mean", "acc_median", "comp_mean",
              "comp_median", "chamfer", "nc", "global_head_chamfer", "procrustes_rot_err",
              "procrustes_trans_err", "procrustes_maa_30"):
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    # PnP assumes the global frame is view 0's camera: invariant to a pure scale only
    scaled = dict(pred, xyz_global=2.5 * pred["xyz_global"])
    c = evaluate_sample(scaled, scene)
    for k in ("pnp_rot_err", "pnp_trans_err", "focal_rel_err"):
        assert c[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k


def test_worse_predictions_score_worse(scene):
    good = evaluate_sample(_prediction(scene, noise=0.01), scene)
    bad = evaluate_sample(_prediction(scene, noise=0.1), scene)
    assert bad["chamfer"] > good["chamfer"] and bad["depth_abs_rel"] > good["depth_abs_rel"]
    assert bad["nc"] < good["nc"]


def test_shape_mismatch_and_bad_reference_raise(scene):
    pred = _prediction(scene)
    with pytest.raises(ValueError, match="reference needs"):
        evaluate_sample(pred, {"depth": scene["depth"]})
    small = {k: v[:2] for k, v in scene.items()}
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_sample(pred, small)
    with pytest.raises(ValueError, match="missing 'conf_local'"):
        evaluate_sample({k: v for k, v in pred.items() if k != "conf_local"}, scene)


# --- baselines and aggregation ------------------------------------------------------------------
def test_plane_baseline_is_exact_on_a_fronto_parallel_scene():
    K = np.array([[20.0, 0, 7.5], [0, 20.0, 5.5], [0, 0, 1]])
    depth = np.stack([np.full((12, 16), 2.0), np.full((12, 16), 3.0)])
    pred = plane_baseline(depth, K)
    assert np.allclose(pred["xyz_local"][..., 2], depth)
    m = evaluate_sample(pred, {"depth": depth, "K": np.stack([K, K]), "c2w": np.eye(4)[None]
                               .repeat(2, 0)})
    assert m["depth_abs_rel"] == pytest.approx(0) and m["chamfer"] == pytest.approx(0, abs=1e-9)


def test_layout_baseline_reproduces_a_training_layout(scene):
    prior = fit_layout_prior([scene["depth"][0], 2.0 * scene["depth"][0]])
    assert np.allclose(prior, scene["depth"][0] / np.median(scene["depth"][0]))
    pred = layout_baseline(prior, scene["depth"][:1], scene["K"][:1])
    assert np.allclose(pred["xyz_local"][0, ..., 2], scene["depth"][0])
    with pytest.raises(ValueError, match="differ in size"):
        fit_layout_prior([np.ones((4, 4)), np.ones((4, 5))])
    with pytest.raises(ValueError, match="no depth maps"):
        fit_layout_prior([])


def test_baselines_are_worse_than_a_good_prediction(scene):
    good = evaluate_sample(_prediction(scene, noise=0.01), scene)
    plane = evaluate_sample(plane_baseline(scene["depth"], scene["K"]), scene)
    assert plane["chamfer"] > 5 * good["chamfer"]
    assert plane["depth_abs_rel"] > good["depth_abs_rel"]


def test_aggregate_ignores_nan_and_reports_count():
    out = aggregate_metrics([{"a": 1.0, "b": float("nan")}, {"a": 3.0, "b": float("nan")}])
    assert out == {"num_samples": 2, "a": 2.0, "b": None}


def test_evaluation_imports_without_torch_or_lightning():
    code = ("import sys, distill3r.evaluation; "
            "bad = [m for m in ('torch', 'lightning') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    subprocess.run([sys.executable, "-c", code], check=True)
