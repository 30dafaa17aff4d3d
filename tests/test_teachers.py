"""Teachers: exact ground truth, and the Fast3R adapter's conversion with a stand-in module."""

import json

import cv2
import numpy as np
import pytest
import torch
from boxroom import camera, random_scene, render_view
from scipy.spatial.transform import Rotation

from distill3r.config import TeacherParams
from distill3r.data.io import write_image
from distill3r.data.view import resize_crop
from distill3r.geometry import invert_pose, transform_points
from distill3r.teachers import TeacherInput, get_teacher
from distill3r.teachers.fast3r import (Fast3RTeacher, align_local_to_global, disable_attn_bias,
                                       fast3r_precision, parse_predictions, plan_view,
                                       preprocess_image)
from distill3r.teachers.groundtruth import GroundTruthTeacher

torch.set_num_threads(1)


def _views(n=3, H=40, W=52, seed=0):
    rng = np.random.default_rng(seed)
    scene = random_scene(rng)
    Ks, c2ws, depths, worlds, images = [], [], [], [], []
    for i in range(n):
        K, c2w = camera(rng, scene, i, n, H, W)
        rgb, depth, world = render_view(scene, K, c2w, H, W)
        Ks.append(K), c2ws.append(c2w), depths.append(depth), worlds.append(world)
        images.append(rgb)
    batch = TeacherInput(images=np.stack(images), depth=np.stack(depths).astype(np.float32),
                         K=np.stack(Ks), c2w=np.stack(c2ws), key="t__s__s000")
    return batch, np.stack(worlds)


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------
def test_groundtruth_points_are_exact():
    batch, worlds = _views()
    out = GroundTruthTeacher(TeacherParams()).predict(batch)
    out.validate(3, (40, 52))
    np.testing.assert_array_equal(out.xyz_local[..., 2], batch.depth)  # z == depth exactly
    w2c0 = invert_pose(batch.c2w[0])
    for j in range(3):
        expected = transform_points(w2c0, worlds[j])  # analytic ray-cast points, view 0 frame
        rel = np.linalg.norm(out.xyz_global[j] - expected, axis=-1) / np.linalg.norm(expected,
                                                                                    axis=-1)
        assert rel.max() < 1e-4
    np.testing.assert_allclose(out.xyz_global[0], out.xyz_local[0], atol=1e-6)


def test_groundtruth_confidence_edges_and_invalid():
    batch, _ = _views(n=2)
    batch.depth[1, :5, :5] = 0.0
    p = TeacherParams(edge_threshold=0.05, edge_confidence=2.0, max_confidence=20.0)
    out = GroundTruthTeacher(p).predict(batch)
    assert set(np.unique(out.conf_global).tolist()) == {1.0, 2.0, 20.0}
    assert not out.mask[1, :5, :5].any() and (out.conf_global[1, :5, :5] == 1).all()
    assert (out.xyz_global[1, :5, :5] == 0).all()
    assert (out.conf_global[1, 5, :4] == 2.0).all()  # next to invalid depth: edge
    d = batch.depth[0]
    jump = np.abs(np.diff(d, axis=1)) / d[:, 1:] > 0.05  # cube silhouette
    rows, cols = np.nonzero(jump)
    assert rows.size > 0 and (out.conf_global[0, rows, cols + 1] == 2.0).all()
    np.testing.assert_array_equal(out.mask, batch.depth > 0)
    again = GroundTruthTeacher(p).predict(batch)
    np.testing.assert_array_equal(again.xyz_global, out.xyz_global)


def test_groundtruth_fingerprint_and_errors():
    a, b = GroundTruthTeacher(TeacherParams()), GroundTruthTeacher(TeacherParams())
    assert a.fingerprint() == b.fingerprint() and a.fingerprint().startswith("groundtruth")
    assert a.fingerprint() != GroundTruthTeacher(TeacherParams(edge_threshold=0.1)).fingerprint()
    assert a.fingerprint() == GroundTruthTeacher(TeacherParams(device="cuda")).fingerprint()
    batch, _ = _views(n=2)
    batch.depth = None
    with pytest.raises(ValueError, match="t__s__s000"):
        a.predict(batch)
    with pytest.raises(ValueError, match="teacher.name"):
        get_teacher(TeacherParams(name="vggt"))
    with pytest.raises(ValueError, match="depth must have shape"):
        TeacherInput(images=np.zeros((2, 4, 4, 3), np.uint8), depth=np.zeros((2, 4, 5), np.float32))


# ---------------------------------------------------------------------------------------------
# Fast3R adapter with a stand-in module
# ---------------------------------------------------------------------------------------------
SIMS = [(1.0, np.eye(3), np.zeros(3)),
        (0.7, Rotation.from_euler("xyz", [10, -25, 5], degrees=True).as_matrix(),
         np.array([0.3, -0.1, 0.5])),
        (1.6, Rotation.from_euler("xyz", [-5, 40, 12], degrees=True).as_matrix(),
         np.array([-0.4, 0.2, 0.1]))]


class StandIn(torch.nn.Module):
    """Returns Fast3R's output structure for known geometry: per view a wavy depth surface
    (local points) and its image under a known similarity (global points). Like Fast3R it draws
    random numbers every forward (image indices): here they perturb the confidence."""

    def __init__(self, low_conf_box=None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.low_conf_box = low_conf_box
        self.seen = []

    def forward(self, views):
        preds = []
        for j, view in enumerate(views):
            _, _, h, w = view["img"].shape
            v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                  torch.arange(w, dtype=torch.float64), indexing="ij")
            z = 2.0 + 0.3 * torch.sin(u / 7.0) * torch.cos(v / 5.0) + 0.1 * j
            f = 0.8 * w
            local = torch.stack([(u - w / 2) / f * z, (v - h / 2) / f * z, z], -1)
            s, R, t = SIMS[j]
            glob = s * local @ torch.from_numpy(R).T + torch.from_numpy(t)
            conf = 3.0 + 5.0 * (u / w) + torch.rand(h, w, dtype=torch.float64)
            if self.low_conf_box is not None:
                conf[: h // 2, : w // 2] = 1.2
            preds.append({"pts3d_in_other_view": glob[None].float() * self.scale,
                          "conf": conf[None].float(), "pts3d_local": local[None].float(),
                          "conf_local": conf[None].float() + 1.0})
        return preds


def stand_in_inference(views, model, device, dtype, verbose=True, profiling=False):
    """Same call signature and output structure as fast3r's ``inference``."""
    model.seen.append((dtype, torch.is_autocast_enabled(device.type)))
    return {"views": views, "preds": model(views)}


@pytest.fixture
def source_batch(tmp_path):
    """3 source images of 60x80 on disk and the cache inputs at 28x42."""
    rng = np.random.default_rng(1)
    paths, images = [], []
    for j in range(3):
        img = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        paths.append(tmp_path / f"src{j}.png")
        write_image(paths[-1], img)
        images.append(resize_crop(img, (28, 42))[0])
    return TeacherInput(images=np.stack(images), image_paths=paths, key="demo__scene__s000")


def _teacher(model, **kw):
    p = TeacherParams(name="fast3r", image_size=64, device="cpu", **kw)
    return Fast3RTeacher(p, model=model, inference_fn=stand_in_inference, weights_id="standin")


def test_fast3r_adapter_shapes_alignment_mask(source_batch):
    model = StandIn(low_conf_box=True)
    out = _teacher(model, conf_threshold=1.5).predict(source_batch)
    out.validate(3, (28, 42))
    # local->global alignment recovers each view's similarity: aligned local == global points
    for j in range(3):
        s, R, t = SIMS[j]
        m = out.mask[j]
        expected = s * out.xyz_local[j][m].astype(np.float64) @ R.T + t
        np.testing.assert_allclose(out.xyz_global[j][m], expected, atol=2e-4)
    # the low-confidence quadrant (conf 1.2 < 1.5) is masked, the rest is kept
    assert not out.mask[:, :12, :18].any()
    assert out.mask[:, 16:, 24:38].all()
    assert (out.conf_global >= 1).all() and (out.conf_local >= 1).all()


def test_fast3r_alignment_recovers_known_similarity():
    rng = np.random.default_rng(0)
    local = rng.normal(size=(2, 20, 30, 3)).astype(np.float32) + np.array([0, 0, 3], np.float32)
    conf = rng.uniform(1, 10, (2, 20, 30)).astype(np.float32)
    glob = np.stack([(SIMS[j + 1][0] * local[j] @ SIMS[j + 1][1].T + SIMS[j + 1][2])
                     for j in range(2)]).astype(np.float32)
    glob[0, 0, :5] += 50.0  # outliers on low-confidence pixels are ignored (top 15% only)
    conf[0, 0, :5] = 1.0
    aligned, sims = align_local_to_global(local, glob, conf)
    for j in range(2):
        s, R, t = sims[j]
        assert abs(s - SIMS[j + 1][0]) < 1e-4
        np.testing.assert_allclose(R, SIMS[j + 1][1], atol=1e-4)
        np.testing.assert_allclose(t, SIMS[j + 1][2], atol=1e-4)
    np.testing.assert_allclose(aligned[1], glob[1], atol=1e-4)


def test_fast3r_seeding_gives_identical_outputs(source_batch):
    model = StandIn()
    teacher = _teacher(model)
    a, b = teacher.predict(source_batch), teacher.predict(source_batch)
    for name in ("xyz_global", "xyz_local", "conf_global", "conf_local", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    views = [{"img": torch.zeros(1, 3, 8, 8)}]  # unseeded forwards do differ
    assert not torch.equal(model(views)[0]["conf"], model(views)[0]["conf"])


def test_fast3r_precision_and_autocast(source_batch):
    assert fast3r_precision("fp32") == "32" and fast3r_precision("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        fast3r_precision("fp16")
    model = StandIn()
    _teacher(model, dtype="fp32").predict(source_batch)
    _teacher(model, dtype="bf16").predict(source_batch)
    assert model.seen == [("32", False), (torch.bfloat16, True)]


def test_fast3r_same_field_of_view():
    """Sampling the Fast3R input at the mapped coordinates reproduces the cache image."""
    h, w = 60, 90
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    source = np.stack([u / w * 255, v / h * 255, 128 + 0 * u], -1).astype(np.uint8)
    for cache_hw in [(28, 42), (28, 28), (42, 28)]:
        cache_img, K_cache, _ = resize_crop(source, cache_hw, K=np.eye(3))
        view = plan_view(source.shape[:2], cache_hw, long_side=64)
        img = preprocess_image(source, view)
        assert img.shape[0] == 3 and img.shape[1] % 16 == 0 and img.shape[2] == 64
        assert img.min() >= -1 and img.max() <= 1
        mx, my = view.cache_to_teacher()
        teacher_rgb = ((img.transpose(1, 2, 0) + 1) * 127.5).astype(np.float32)
        back = cv2.remap(teacher_rgb, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        hf, wf = img.shape[1:]
        inside = (mx >= -0.5) & (mx <= wf - 0.5) & (my >= -0.5) & (my <= hf - 0.5)
        assert inside.mean() > 0.9
        assert view.transposed == (cache_hw[0] > cache_hw[1])  # portrait: transposed input
        err = np.abs(back[..., :2] - cache_img[..., :2].astype(np.float32))[inside]
        assert err.max() < 4.0, (cache_hw, err.max())
        # the cache transform is resize_crop's: principal point maps like K does
        x, y = view.cache.to_output(np.float64(0.0), np.float64(0.0))
        assert abs(x - K_cache[0, 2]) < 1e-9 and abs(y - K_cache[1, 2]) < 1e-9


def test_fast3r_output_structure_errors():
    good = {"pts3d_in_other_view": torch.zeros(1, 4, 6, 3), "conf": torch.ones(1, 4, 6),
            "pts3d_local": torch.zeros(1, 4, 6, 3), "conf_local": torch.ones(1, 4, 6)}
    assert parse_predictions({"preds": [good, good]}, 2)["global"].shape == (2, 4, 6, 3)
    with pytest.raises(ValueError, match="list of 3"):
        parse_predictions({"preds": [good, good]}, 3)
    with pytest.raises(ValueError, match="conf_local"):
        parse_predictions({"preds": [{k: v for k, v in good.items() if k != "conf_local"}]}, 1)
    batch2 = dict(good, conf=torch.ones(2, 4, 6))
    with pytest.raises(ValueError, match="expected"):
        parse_predictions({"preds": [batch2]}, 1)


def test_fast3r_lazy_import_and_attn_bias():
    teacher = get_teacher(TeacherParams(name="fast3r", device="cpu"))  # no fast3r import yet
    assert isinstance(teacher, Fast3RTeacher)
    try:
        import fast3r  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="external/README.md"):
            teacher._ensure_loaded()

    class Block(torch.nn.Module):
        attn_bias_for_inference_enabled = True

    model = torch.nn.Sequential(Block(), Block())
    assert disable_attn_bias(model) == 2
    assert not any(m.attn_bias_for_inference_enabled for m in model)


# ---------------------------------------------------------------------------------------------
# A saved model as the teacher
# ---------------------------------------------------------------------------------------------
def test_checkpoint_teacher_cache_round_trips_the_models_own_inference(tmp_path, monkeypatch):
    import dataclasses
    import shutil

    from boxroom import make_box_room_manifest

    import distill3r.teachers.checkpoint as checkpoint_teacher
    from distill3r.cache.reader import read_split
    from distill3r.cache.writer import build_cache
    from distill3r.config import CacheParams, Params
    from distill3r.inputs import images_to_input
    from distill3r.models import build_student, save_student
    from distill3r.training.data import check_cache

    torch.manual_seed(0)
    folder = save_student(build_student("tiny"), tmp_path / "teacher")
    manifest = make_box_room_manifest(tmp_path / "raw", num_scenes=2, frames=3, height=42,
                                      width=56, val_scenes=1)
    params = Params()
    params.cache = CacheParams(image_size=[28, 42], views_per_sample=3, max_samples_per_scene=1)
    params.teacher = dataclasses.replace(params.teacher, name="checkpoint",
                                         checkpoint=str(folder), device="cpu", dtype="fp32",
                                         conf_threshold=1.0)
    build_cache(manifest, tmp_path / "cache", params, progress=False)
    teacher = get_teacher(params.teacher)
    index = json.loads((tmp_path / "cache" / "train" / "index.json").read_text())
    assert index["teacher"]["fingerprint"] == teacher.fingerprint()
    assert index["teacher"]["weights"] == json.loads((folder / "config.json").read_text())["sha256"]
    model = teacher._load()
    (sample,) = list(read_split(tmp_path / "cache" / "train"))
    images = (sample["images"].permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    with torch.inference_mode():
        own = model(images_to_input(images)[None])
    for key in ("xyz_global", "xyz_local", "conf_global", "conf_local"):
        want = own[key][0].float().numpy()
        np.testing.assert_allclose(sample[key].numpy(), want, rtol=1e-3, atol=1e-3)  # float16
    assert sample["mask"].all()
    # another model is another teacher
    torch.manual_seed(1)
    other = save_student(build_student("tiny"), tmp_path / "other")
    other_params = dataclasses.replace(params.teacher, checkpoint=str(other))
    assert get_teacher(other_params).fingerprint() != teacher.fingerprint()
    empty = TeacherInput(images=np.zeros((2, 28, 42, 3), np.uint8))
    with pytest.raises(ValueError, match="cannot load the teacher from .*config.json"):
        get_teacher(dataclasses.replace(params.teacher, checkpoint=str(tmp_path))).predict(empty)
    with pytest.raises(ValueError, match="nope: teacher.checkpoint is not a model folder"):
        get_teacher(dataclasses.replace(params.teacher, checkpoint=str(tmp_path / "nope"))
                    ).predict(empty)

    # the train stage checks the cache against the teacher folder and the model code it has now
    splits = [json.loads((tmp_path / "cache" / s / "index.json").read_text())
              for s in ("train", "val")]
    check_cache(*splits, params, tmp_path / "cache")
    code = tmp_path / "code"  # a copy of the model code: line endings alone change nothing
    for part in checkpoint_teacher.MODEL_CODE:
        src = checkpoint_teacher.PACKAGE / part
        if src.is_dir():
            shutil.copytree(src, code / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, code / part)
    dpt = code / "models" / "dpt.py"
    dpt.write_bytes(dpt.read_bytes().replace(b"\n", b"\r\n"))
    assert checkpoint_teacher.model_code_digest(code) == teacher.code()
    dpt.write_bytes(dpt.read_bytes() + b"# an edit\r\n")
    monkeypatch.setattr(checkpoint_teacher, "PACKAGE", code)
    assert get_teacher(params.teacher).fingerprint() != teacher.fingerprint()
    with pytest.raises(ValueError, match=r"train/index.json: cache built by checkpoint teacher "
                       r".*the model code \(distill3r/models\) changed since.*--force cache"):
        check_cache(*splits, params, tmp_path / "cache")
    # a cache pulled without the teacher folder: only the teacher's name can be checked
    gone = dataclasses.replace(params, teacher=dataclasses.replace(
        params.teacher, checkpoint=str(tmp_path / "absent")))
    check_cache(*splits, gone, tmp_path / "cache")
