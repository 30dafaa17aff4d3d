"""Two-process DDP training on the CPU (gloo) through the real stage command line.

Uneven data on purpose: 15 training samples in 3 shards of 6, 6 and 3 for 2 ranks with batch 2,
so a naive shard split would give the ranks 9 and 6 samples and hang the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict

import pytest

from training_helpers import build_tiny_cache, run_train, tiny_params, train_cmd, write_params


@pytest.mark.slow
def test_two_rank_ddp_runs_several_epochs_on_uneven_shards_with_disjoint_data(tmp_path):
    params = tiny_params(f"sqlite:///{tmp_path / 'mlflow.db'}", devices=2, strategy="ddp",
                         num_workers=2, batch_size=2, max_steps=7, val_every_steps=100,
                         checkpoint_every_steps=100)
    params = dataclasses.replace(params, cache=dataclasses.replace(params.cache,
                                                                   shard_max_samples=6))
    cache = build_tiny_cache(tmp_path, params, num_scenes=7, val_scenes=2)
    index = json.loads((cache / "train" / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [6, 6, 3]

    cmd = train_cmd(write_params(params, tmp_path / "params.yaml"), cache, tmp_path / "student",
                    tmp_path / "ckpt", "--debug-keys", tmp_path / "keys")
    out = run_train(cmd, tmp_path, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (tmp_path / "student" / "model.safetensors").is_file()

    per_rank = {}
    for rank in (0, 1):
        lines = (tmp_path / "keys" / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank[rank] = [json.loads(line) for line in lines]
    # 15 // (2 ranks * 2) = 3 batches per rank per epoch: 7 steps = epochs 0, 1 and 2.
    for rank, rows in per_rank.items():
        assert [r["step"] for r in rows] == list(range(7)), rank
        assert Counter(r["epoch"] for r in rows) == {0: 3, 1: 3, 2: 1}, rank
        assert all(len(r["keys"]) == 2 for r in rows)
    for epoch in (0, 1):
        keys = defaultdict(list)
        for rank, rows in per_rank.items():
            keys[rank] = [k for r in rows if r["epoch"] == epoch for k in r["keys"]]
        assert len(keys[0]) == len(keys[1]) == 6
        assert not set(keys[0]) & set(keys[1]), f"ranks shared samples in epoch {epoch}"
        assert len(set(keys[0]) | set(keys[1])) == 12  # nobody repeats a sample in an epoch
