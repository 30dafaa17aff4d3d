"""RLE of boolean masks: exact round trip for any shape, clear errors on corrupt input."""

import numpy as np
import pytest

from distill3r.cache.rle import rle_decode, rle_encode


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 4), (2, 5, 6), (2, 3, 4, 5)])
def test_round_trip_random(shape):
    rng = np.random.default_rng(len(shape))
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        mask = rng.random(shape) < p
        runs = rle_encode(mask)
        assert runs.dtype == np.int32 and runs.ndim == 1
        assert int(runs.sum()) == mask.size
        back = rle_decode(runs, np.asarray(mask.shape, np.int64))
        assert back.dtype == np.bool_ and back.shape == mask.shape
        np.testing.assert_array_equal(back, mask)


def test_runs_start_with_false_run():
    assert rle_encode(np.array([True, True, False])).tolist() == [0, 2, 1]
    assert rle_encode(np.array([False, True, True, False, False])).tolist() == [1, 2, 2]
    assert rle_encode(np.zeros((2, 3), bool)).tolist() == [6]
    assert rle_encode(np.ones((2, 3), bool)).tolist() == [0, 6]


def test_c_order():
    mask = np.array([[True, False], [True, False]])
    assert rle_encode(mask).tolist() == [0, 1, 1, 1, 1]
    assert rle_decode(np.array([0, 1, 1, 1, 1], np.int32), [2, 2]).tolist() == mask.tolist()


def test_structured_mask_compresses():
    mask = np.zeros((4, 112, 112), bool)
    mask[:, 20:90, 10:100] = True
    assert rle_encode(mask).size < 4 * 112 * 2 + 2


def test_rejects_non_bool():
    with pytest.raises(ValueError, match="bool"):
        rle_encode(np.ones(3, np.uint8))


@pytest.mark.parametrize("runs, shape, message", [
    (np.array([1, 2], np.int32), [4], "cover 3 elements"),
    (np.array([5, -1], np.int32), [4], "negative run"),
    (np.array([1.0, 3.0]), [4], "integer"),
    (np.array([[1, 3]], np.int32), [4], "1-D"),
    (np.array([4], np.int32), [-4], "negative dimension"),
    (np.array([4], np.int32), [[2, 2]], "shape"),
])
def test_corrupt_rle(runs, shape, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(runs, np.asarray(shape))
