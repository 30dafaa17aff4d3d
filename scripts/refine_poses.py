"""Pose metrics of ``infer`` without and with ``refine`` on scenes with true poses.

    python scripts/refine_poses.py data/raw/demo --checkpoint models/student \
        --manifest data/manifest.csv --split val [--params params.yaml]

Runs :func:`distill3r.inference.run_inference` (the ``infer`` section of ``--params``) twice
on the listed demo scenes, once with ``refine: false`` and once with ``refine: true``, and
scores the poses written to ``<scene>_cameras.json`` against each scene's own
``cameras.json`` over all view pairs (:func:`distill3r.evaluation.poses.pose_metrics`). Prints
one JSON row per setting. The scenes: those of ``--split`` in ``--manifest``, else every scene
folder under the root.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from distill3r.config import load_params
from distill3r.evaluation.poses import pose_metrics, relative_pose_errors
from distill3r.inference import run_inference


def _scenes(root: Path, manifest: str | None, split: str) -> list[str]:
    if manifest is None:
        return sorted(p.name for p in root.iterdir() if (p / "cameras.json").is_file())
    with open(manifest, newline="") as fh:
        return sorted({row["scene"] for row in csv.DictReader(fh) if row["split"] == split})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder of demo scenes (rgb/ + cameras.json)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--manifest", help="manifest CSV naming each scene's split")
    parser.add_argument("--split", default="val")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params).infer
    scenes = _scenes(args.root, args.manifest, args.split)
    with tempfile.TemporaryDirectory() as tmp:
        links = Path(tmp) / "scenes"
        links.mkdir()
        for name in scenes:
            (links / name).symlink_to((args.root / name).resolve())
        for refine in (False, True):
            infos = run_inference(links, args.checkpoint, Path(tmp) / f"out{int(refine)}",
                                  dataclasses.replace(params, refine=refine))
            rot, trans = [], []
            for info in infos:
                pred = json.loads(Path(info["outputs"]["cameras.json"]).read_text())
                true = json.loads((links / info["scene"] / "cameras.json").read_text())
                r, t = relative_pose_errors(np.array([f["c2w"] for f in pred["frames"]]),
                                            np.array([f["c2w"] for f in true["frames"]]))
                rot.append(r)
                trans.append(t)
            seconds = sum(i["refine"]["seconds"] for i in infos) if refine else 0.0
            row = {"refine": refine, "scenes": len(infos),
                   "pairs": int(sum(len(r) for r in rot)), "refine_seconds": round(seconds, 1),
                   **{k: round(v, 4) for k, v in pose_metrics(np.concatenate(rot),
                                                              np.concatenate(trans)).items()}}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
