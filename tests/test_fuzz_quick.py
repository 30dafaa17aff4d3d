"""A seeded quick run of the cache fuzz harness (``tests/fuzz/cache_fuzz.py``) in-process."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import cache_fuzz  # noqa: E402


@pytest.mark.parametrize("target, inputs", [("rle", 400), ("sample", 200), ("shard", 200)])
def test_fuzzed_inputs_decode_exactly_or_raise_named_cache_errors(target, inputs, tmp_path):
    counts = cache_fuzz.run_target(target, 0, inputs, seed=7, workdir=tmp_path, bomb_mb=16)
    assert set(counts) <= {"ok", "error"}, counts  # no silent change/drop, no unnamed error
    assert counts.get("error", 0) > inputs // 4  # the mutations do reach the checks
