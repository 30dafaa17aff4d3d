"""The Fast3R adapter's inputs: landscape, width 512, an aspect Fast3R was trained on, and every
unmasked cache pixel fed from the teacher pixel it maps to, for both patch-embedding kinds."""

import cv2
import numpy as np
import pytest
import torch

from distill3r.config import TeacherParams
from distill3r.data.io import write_image
from distill3r.data.view import resize_crop
from distill3r.teachers import TeacherInput
from distill3r.teachers.fast3r import TRAIN_HEIGHTS_512, Fast3RTeacher

CACHE_SIZES = [(112, 112), (224, 518), (518, 224), (392, 518)]
SOURCES = {"4:3": (480, 640), "3:4": (640, 480), "1:1": (512, 512), "16:9": (360, 640)}


class ManyAR_PatchEmbed(torch.nn.Module):  # noqa: N801 -- upstream's class name is the signal
    """Like upstream's: a landscape tensor, portrait views given by ``true_shape``."""

    def forward(self, img, true_shape):
        _, _, h, w = img.shape
        assert w >= h, "img should be in landscape mode"
        th, tw = (int(x) for x in true_shape[0])
        if th > tw:  # portrait: the network works on the view as it really is
            assert (th, tw) == (w, h)
            return img.swapaxes(-1, -2), True
        assert (th, tw) == (h, w)
        return img, False


class CoordinateStandIn(torch.nn.Module):
    """Predicts, for every pixel of the image the network sees, its pixel coordinates as the
    point's x and y (z varies smoothly): so each cache pixel tells which teacher pixel fed it.
    With ``many_ar`` it sees portrait views as portrait (then hands the maps back in the
    landscape layout, as upstream's heads do); otherwise it sees the tensor as it is."""

    def __init__(self, many_ar: bool):
        super().__init__()
        self.patch_embed = ManyAR_PatchEmbed() if many_ar else None
        self.inputs = []

    def forward(self, views):
        preds = []
        for view in views:
            img = view["img"]
            self.inputs.append((img.clone(), tuple(int(x) for x in view["true_shape"][0])))
            swapped = False
            if self.patch_embed is not None:
                img, swapped = self.patch_embed(img, torch.from_numpy(view["true_shape"]))
            _, _, h, w = img.shape
            v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                  torch.arange(w, dtype=torch.float64), indexing="ij")
            pts = torch.stack([u, v, 1.0 + 0.01 * u + 0.02 * v], -1)
            conf = torch.full((h, w), 5.0, dtype=torch.float64)
            if swapped:
                pts, conf = pts.transpose(0, 1), conf.transpose(0, 1)
            preds.append({"pts3d_in_other_view": pts[None].float(), "conf": conf[None].float(),
                          "pts3d_local": pts[None].float(), "conf_local": conf[None].float()})
        return preds


def _inference(views, model, device, dtype, verbose=True, profiling=False):
    return {"views": views, "preds": model(views)}


def _texture(h: int, w: int) -> np.ndarray:
    """A smooth colour texture (periods of 50-90 px): colours locate a pixel to ~0.1 px."""
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = [np.sin(u / 13.0 + 0.3) + np.cos(v / 11.0),
                np.sin(v / 9.0 - 0.7) + np.cos((u + v) / 15.0),
                np.sin((u - v) / 12.0 + 1.1)]
    return np.clip(128 + 60 * np.stack(channels, -1), 0, 255).astype(np.uint8)


def _run(tmp_path, source_hw, cache_hw, many_ar):
    source = _texture(*source_hw)
    paths = []
    for j in range(2):
        paths.append(tmp_path / f"v{j}.png")
        write_image(paths[-1], source)
    cache_img = resize_crop(source, cache_hw)[0]
    batch = TeacherInput(images=np.stack([cache_img] * 2), image_paths=paths, key="d__s__s000")
    model = CoordinateStandIn(many_ar)
    teacher = Fast3RTeacher(TeacherParams(name="fast3r", device="cpu", dtype="fp32"),
                            model=model, inference_fn=_inference, weights_id="coords")
    return cache_img, model, teacher.predict(batch)


def masked_fraction(source_hw, cache_hw, tmp_path) -> float:
    return float(1 - _run(tmp_path, source_hw, cache_hw, True)[2].mask.mean())


@pytest.mark.parametrize("many_ar", [True, False], ids=["many_ar", "plain"])
@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("cache_hw", CACHE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_teacher_input_and_pixel_mapping(tmp_path, cache_hw, source, many_ar):
    cache_img, model, out = _run(tmp_path, SOURCES[source], cache_hw, many_ar)
    src_h, src_w = SOURCES[source]
    # transposed: a portrait view, or a square view of a portrait photo
    portrait = cache_hw[0] > cache_hw[1] or (cache_hw[0] == cache_hw[1] and src_h > src_w)
    for img, true_shape in model.inputs:
        _, _, h, w = img.shape
        assert w == 512 and h % 16 == 0 and 512 / 384 <= w / h <= 512 / 160, (h, w)
        expected_shape = (w, h) if portrait and many_ar else (h, w)
        assert true_shape == expected_shape
    tensor = ((model.inputs[0][0][0].numpy().transpose(1, 2, 0) + 1) * 127.5).astype(np.float32)
    mask = out.mask[0]
    assert mask.mean() >= 0.7  # the worst case, a square crop of a square photo, keeps 3/4
    # the teacher pixel each cache pixel received, in the coordinates of the tensor
    xy = out.xyz_local[0][..., :2].astype(np.float64)
    tx, ty = (xy[..., 1], xy[..., 0]) if portrait else (xy[..., 0], xy[..., 1])
    np.testing.assert_allclose(out.xyz_global[0][mask], out.xyz_local[0][mask], atol=2e-2)
    seen = cv2.remap(tensor, tx.astype(np.float32), ty.astype(np.float32), cv2.INTER_LINEAR)
    err = np.abs(seen - cache_img.astype(np.float32)).max(-1)[mask]
    # what the teacher saw there is what the student sees (interpolation error only)
    assert np.percentile(err, 99) < 4.0 and err.mean() < 1.0, (err.mean(), err.max())


def test_training_sizes_are_used_where_the_cache_view_allows(tmp_path):
    for cache_hw in CACHE_SIZES:
        model = _run(tmp_path, SOURCES["4:3"], cache_hw, True)[1]
        assert model.inputs[0][0].shape[2] in TRAIN_HEIGHTS_512, cache_hw


def test_masked_only_where_the_teacher_cannot_see(tmp_path):
    """A square cache of a square photo: Fast3R gets 512x384, the top and bottom eighths are
    masked; a square cache of a 4:3 or (transposed) 3:4 photo is covered completely."""
    assert masked_fraction(SOURCES["1:1"], (112, 112), tmp_path) == pytest.approx(0.25,
                                                                               abs=0.02)
    assert masked_fraction(SOURCES["4:3"], (112, 112), tmp_path) == 0.0
    assert masked_fraction(SOURCES["3:4"], (112, 112), tmp_path) == 0.0
