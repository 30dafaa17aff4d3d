"""Real DVC remotes: push WebDataset shards from one clone, pull them byte-identical in another.

Two remotes: a local folder, and SSH against a real sshd on 127.0.0.1 (key auth, the key in
`.dvc/config.local` of each clone). Without an sshd binary the SSH test skips locally and fails
in CI (`CI` set).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from services import sshd, sshd_available

DVC = Path(sys.executable).parent / "dvc"
ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "DVC_NO_ANALYTICS": "1",
}


def run(cmd: list, cwd: Path, ok: bool = True) -> str:
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=dict(os.environ, **ENV), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if ok:
        assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    else:
        assert out.returncode != 0, f"{cmd} should have failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_shard(path: Path, seed: int, samples: int = 2) -> None:
    """A small WebDataset shard: per sample a teacher.npz, an images.npz and a meta.json."""
    rng = np.random.default_rng(seed)
    with wds.TarWriter(str(path)) as sink:
        for i in range(samples):
            sink.write({
                "__key__": f"demo__scene_{seed:04d}__s{i:03d}",
                "teacher.npz": npz_bytes(
                    xyz_global=rng.standard_normal((2, 14, 14, 3)).astype(np.float16),
                    conf_global=(1 + rng.random((2, 14, 14))).astype(np.float16),
                ),
                "images.npz": npz_bytes(images=rng.integers(0, 255, (2, 14, 14, 3), np.uint8)),
                "meta.json": b'{"dataset": "demo"}',
            })  # fmt: skip


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def remote_objects(remote: Path) -> int:
    return sum(1 for p in remote.rglob("*") if p.is_file())


def make_repo(tmp_path: Path) -> Path:
    """A git + DVC repository tracking a folder of three shards (`dvc add`), committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo)
    run([DVC, "init", "-q"], repo)
    shards = repo / "data" / "cache" / "train"
    shards.mkdir(parents=True)
    for k in range(3):
        write_shard(shards / f"shard-{k:06d}.tar", seed=k)
    (shards / "index.json").write_text('{"samples": 6}\n')
    run([DVC, "add", "-q", "data/cache/train"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "shards"], repo)
    return repo


def clone_and_pull(repo: Path, dest: Path, local_config: list[list[str]] = ()) -> Path:
    """`git clone` the repo, apply per-machine `dvc remote modify --local` settings, `dvc pull`."""
    run(["git", "clone", "-q", str(repo), str(dest)], repo.parent)
    assert not (dest / "data" / "cache" / "train").exists()
    for args in local_config:
        run([DVC, "remote", "modify", "--local", *args], dest)
    run([DVC, "pull", "-q"], dest)
    return dest


def assert_same_shards(a: Path, b: Path) -> None:
    want, got = files_of(a / "data" / "cache" / "train"), files_of(b / "data" / "cache" / "train")
    assert sorted(got) == sorted(want) and len(want) == 4
    assert all(got[name] == want[name] for name in want)
    # The pulled shards are readable WebDataset shards.
    pulled = b / "data" / "cache" / "train" / "shard-000000.tar"
    samples = list(wds.WebDataset(str(pulled), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["demo__scene_0000__s000", "demo__scene_0000__s001"]
    assert samples[0]["images.npz"]["images"].shape == (2, 14, 14, 3)


@pytest.mark.slow  # git + dvc push/pull
def test_local_remote_push_then_pull_in_fresh_clone(tmp_path):
    repo = make_repo(tmp_path)
    remote = tmp_path / "remote"
    run([DVC, "remote", "add", "-d", "storage", remote], repo)
    run(["git", "commit", "-q", "-am", "remote"], repo)
    run([DVC, "push", "-q"], repo)
    assert remote_objects(remote) == 5  # 4 files + the folder's .dir listing

    clone = clone_and_pull(repo, tmp_path / "clone")
    assert_same_shards(repo, clone)

    # A new shard: the next push uploads only it and the new folder listing.
    write_shard(repo / "data" / "cache" / "train" / "shard-000003.tar", seed=3)
    run([DVC, "add", "-q", "data/cache/train"], repo)
    run(["git", "commit", "-q", "-am", "one more shard"], repo)
    run([DVC, "push", "-q"], repo)
    assert remote_objects(remote) == 7
    run(["git", "pull", "-q"], clone)
    run([DVC, "pull", "-q"], clone)
    pulled = files_of(clone / "data" / "cache" / "train")
    assert pulled == files_of(repo / "data" / "cache" / "train") and len(pulled) == 5


@pytest.fixture
def ssh_server(tmp_path):
    if not sshd_available():
        if os.environ.get("CI"):
            pytest.fail("sshd (openssh-server) is missing in CI: the SSH remote test cannot run")
        pytest.skip("sshd not installed (apt-get install openssh-server)")
    with sshd(tmp_path / "sshd") as server:
        yield server


def test_ssh_remote_push_then_pull_in_fresh_clone(tmp_path, ssh_server):
    repo = make_repo(tmp_path)
    remote = tmp_path / "ssh-remote"  # the server's filesystem is this machine's
    s = ssh_server
    url = f"ssh://{s.user}@{s.host}:{s.port}{remote}"
    run([DVC, "remote", "add", "-d", "lab", url], repo)
    run(["git", "commit", "-q", "-am", "ssh remote"], repo)
    # The key is per machine: it goes in the untracked .dvc/config.local, never in git.
    run([DVC, "remote", "modify", "--local", "lab", "keyfile", s.key_path], repo)
    assert str(s.key_path) not in (repo / ".dvc" / "config").read_text()
    assert str(s.key_path) in (repo / ".dvc" / "config.local").read_text()
    run([DVC, "push", "-q"], repo)
    assert remote_objects(remote) == 5

    # A fresh clone without the key cannot pull (the server accepts only that key).
    keyless = tmp_path / "keyless"
    run(["git", "clone", "-q", str(repo), str(keyless)], tmp_path)
    assert "Permission denied" in run([DVC, "pull"], keyless, ok=False)
    assert not (keyless / "data" / "cache" / "train").exists()

    clone = clone_and_pull(repo, tmp_path / "clone", [["lab", "keyfile", s.key_path]])
    assert_same_shards(repo, clone)
    sshd_log = (tmp_path / "sshd" / "sshd.log").read_text()
    assert f"Accepted publickey for {s.user}" in sshd_log
