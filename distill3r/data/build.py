"""Build the manifest (one CSV row per frame) from the sources in params ``data``.

Steps, all deterministic:
1. every source lists its scenes (``distill3r.data.sources``); a scene the source cannot read
   (missing annotation file, unsupported camera model...) is skipped and reported;
2. ``sample_frac`` keeps a stable, hash-chosen subset of each source's scenes;
3. scenes with fewer than ``min_frames`` frames are reported and skipped;
4. images whose long edge exceeds ``resize_max`` are resized (aspect kept) into
   ``images_dir/<dataset>/<scene>/`` with ``K`` scaled and depth resampled (``view.resize_crop``);
   smaller images are referenced in place. Every image is decoded once to check it; depth
   in a dataset's own encoding is converted to ``.npy`` metres there too. A scene with an
   unreadable image or a depth map of the wrong size is skipped whole and reported;
5. each remaining scene goes to ``val`` when ``hash(split_salt, dataset, scene) <
   val_fraction``, else ``train`` (a scene's split does not depend on the other scenes); with
   two or more scenes and 0 < val_fraction < 1 each split gets at least one scene (the
   extreme-hash scene moves).

The report (``manifest_report.json``) lists every skipped scene with the file and the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from distill3r.progress import progress_bar

from distill3r.atomic import replacing
from distill3r.config import DataParams
from distill3r.data.io import read_image, write_depth_png, write_image
from distill3r.data.view import resize_crop
from distill3r.data.manifest import FrameRecord, write_manifest
from distill3r.data.sources import Frame, Scene, SkipFrame, Source, make_source
from distill3r.jsonio import write_json
from distill3r.seeding import stable_unit

log = logging.getLogger(__name__)


def assign_splits(keys: list[tuple[str, str]], val_fraction: float, salt: str,
                  ) -> dict[tuple[str, str], str]:
    """``{(dataset, scene): "train" | "val"}`` by a stable hash of each key."""
    u = {k: stable_unit(salt, "split", *k) for k in keys}
    split = {k: ("val" if u[k] < val_fraction else "train") for k in keys}
    if len(keys) >= 2 and 0.0 < val_fraction < 1.0:
        if "val" not in split.values():
            split[min(keys, key=u.get)] = "val"
        if "train" not in split.values():
            split[max(keys, key=u.get)] = "train"
    return split


def _output_paths(images_dir: Path, dataset: str, scene: str, frame: Frame,
                  depth_suffix: str) -> tuple[Path, Path]:
    suffix = ".jpg" if frame.image.suffix.lower() in (".jpg", ".jpeg") else ".png"
    folder = images_dir / dataset / scene
    stem = f"{frame.frame:06d}"
    return folder / f"{stem}{suffix}", folder / "depth" / f"{stem}{depth_suffix}"


def prepare_frame(source: Source, split: str, scene: Scene, frame: Frame, resize_max: int,
                  images_dir: Path) -> tuple[FrameRecord, bool]:
    """Check (decode) one frame, resize it if needed and convert its depth to the project's
    encoding if the source has its own: ``(record, resized)``. ``ValueError`` naming the file
    and scene if anything is unreadable or inconsistent."""
    image = read_image(frame.image)  # ValueError naming the file if unreadable
    h, w = image.shape[:2]
    if frame.size is not None and tuple(frame.size) != (h, w):
        raise ValueError(f"{frame.image}: image is {w}x{h} but the dataset's camera is "
                         f"{frame.size[1]}x{frame.size[0]}, so K would be wrong (scene "
                         f"{scene.name})")
    depth = source.read_depth(frame) if frame.depth is not None else None
    if depth is not None and depth.shape != (h, w):
        raise ValueError(f"{frame.depth}: depth is {depth.shape[1]}x{depth.shape[0]} but the "
                         f"image {frame.image} is {w}x{h} (scene {scene.name})")
    record = FrameRecord(dataset=source.name, split=split, scene=scene.name, frame=frame.frame,
                         image=Path(frame.image).resolve(),
                         depth=None if frame.depth is None else Path(frame.depth).resolve(),
                         K=frame.K, c2w=frame.c2w)
    resized = max(h, w) > resize_max
    native = frame.depth is not None and source.depth_is_native(frame)
    convert = depth is not None and (resized or not native)
    depth_suffix = ".png" if native and Path(frame.depth).suffix == ".png" else ".npy"
    image_path, depth_path = _output_paths(images_dir, source.name, scene.name, frame,
                                           depth_suffix)
    if resized:
        s = resize_max / max(h, w)
        size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
        image, record.K, depth = resize_crop(image, size, frame.K, depth)
        with replacing(image_path) as tmp:  # the previous manifest may point at this file
            write_image(tmp, image)
        record.image = image_path.resolve()
    if convert:
        with replacing(depth_path) as tmp:
            if depth_suffix == ".npy":
                np.save(tmp, depth.astype(np.float32), allow_pickle=False)
            else:
                write_depth_png(tmp, depth)
        record.depth = depth_path.resolve()
    return record, resized


def _prepare_scene(source: Source, split: str, scene: Scene, params: DataParams,
                   images_dir: Path) -> tuple[list[FrameRecord], int]:
    records, resized, dropped = [], 0, []
    for frame in scene.frames:
        try:
            record, was_resized = prepare_frame(source, split, scene, frame, params.resize_max,
                                                images_dir)
        except SkipFrame as exc:
            dropped.append(str(exc))
            continue
        records.append(record)
        resized += was_resized
    if dropped:
        source.warn(f"{scene.path}: {len(dropped)} frame(s) dropped (scene {scene.name}), "
                    f"e.g. {dropped[0]}")
    if len(records) < params.min_frames:
        raise ValueError(f"{len(records)} usable frame(s) < data.min_frames={params.min_frames}")
    return records, resized


def _skip(report: dict, dataset: str, scene: str, path, reason: str) -> None:
    log.warning("%s: scene %s of %s skipped: %s", path, scene, dataset, reason)
    report["skipped"].append({"dataset": dataset, "scene": scene, "path": str(path),
                              "reason": reason})


def _collect(params: DataParams, report: dict,
             progress: bool = False) -> tuple[list[Source], list[tuple[Source, Scene]]]:
    """The sources, and the scenes kept after sampling and the min_frames rule as
    ``(source, scene)``."""
    sources: list[Source] = []
    kept: list[tuple[Source, Scene]] = []
    seen: dict[tuple[str, str], Path] = {}
    for i, src_params in enumerate(params.sources):
        source = make_source(src_params, f"data.sources[{i}]")
        sources.append(source)
        scenes = source.scenes(progress)
        for skipped in source.skipped:
            report["skipped"].append({"dataset": source.name, **skipped})
        stats = {"kind": source.kind, "root": str(source.root),
                 "scenes_listed": len(scenes) + len(source.skipped),
                 "scenes_unreadable": len(source.skipped),
                 "scenes_sampled_out": 0, "scenes_too_short": 0}
        for scene in scenes:
            key = (source.name, scene.name)
            if key in seen:
                raise ValueError(f"{scene.path}: scene {scene.name!r} of dataset {source.name!r} "
                                 f"also comes from {seen[key]}; give the sources distinct names")
            seen[key] = scene.path
            if stable_unit(params.split_salt, "sample", *key) >= src_params.sample_frac:
                stats["scenes_sampled_out"] += 1
                continue
            if len(scene.frames) < params.min_frames:
                _skip(report, source.name, scene.name, scene.path,
                      f"{len(scene.frames)} frame(s) < data.min_frames={params.min_frames}")
                stats["scenes_too_short"] += 1
                continue
            kept.append((source, scene))
        report["datasets"][source.name] = stats
    return sources, kept


def build_manifest(params: DataParams, out_csv: str | Path, images_dir: str | Path,
                   report_path: str | Path | None = None, progress: bool = False) -> dict:
    """Write the manifest CSV (and the JSON report if ``report_path``); return the report:
    ``{"frames", "scenes", "splits": {split: {"scenes", "frames"}}, "resized_frames",
    "datasets": {name: counts}, "skipped": [{"dataset","scene","path","reason"}], "warnings"}``.
    """
    params.validate("data")
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when nothing is resized
    report: dict = {"datasets": {}, "skipped": [], "warnings": []}
    sources, kept = _collect(params, report, progress)
    prepared: list[tuple[Source, Scene, list[FrameRecord]]] = []
    resized = 0
    for source, scene in progress_bar(kept, desc="manifest", unit="scene", disable=not progress):
        try:
            scene_records, scene_resized = _prepare_scene(source, "train", scene, params,
                                                          images_dir)
        except ValueError as exc:
            _skip(report, source.name, scene.name, scene.path, str(exc))
            report["datasets"][source.name]["scenes_unreadable"] += 1
            continue
        prepared.append((source, scene, scene_records))
        resized += scene_resized
    # splits among the scenes that made it, so a skipped scene cannot leave a split empty
    splits = assign_splits([(src.name, s.name) for src, s, _ in prepared], params.val_fraction,
                           params.split_salt)
    for source in sources:  # listing and preparing both warn (skipped files, dropped frames)
        report["warnings"].extend(source.warnings)
    records: list[FrameRecord] = []
    counts = {"train": {"scenes": 0, "frames": 0}, "val": {"scenes": 0, "frames": 0}}
    for source, scene, scene_records in prepared:
        split = splits[(source.name, scene.name)]
        for r in scene_records:
            r.split = split
        records.extend(scene_records)
        counts[split]["scenes"] += 1
        counts[split]["frames"] += len(scene_records)
    report.update(frames=len(records), scenes=counts["train"]["scenes"] + counts["val"]["scenes"],
                  splits=counts, resized_frames=resized)
    if report_path is not None:  # also when nothing is usable: it says why
        write_json(report_path, report, sort_keys=True)
    if not records:
        reasons = "; ".join(f"{s['dataset']}/{s['scene']}: {s['reason']}"
                            for s in report["skipped"][:5])
        raise ValueError(f"data.sources: no usable scene ({len(report['skipped'])} skipped: "
                         f"{reasons})")
    write_manifest(records, out_csv)
    log.info("manifest %s: %d frames, train %d / val %d scenes, %d skipped", out_csv,
             len(records), counts["train"]["scenes"], counts["val"]["scenes"],
             len(report["skipped"]))
    return report
