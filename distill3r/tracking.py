"""MLflow tracking: one run per training, shared by the later stages.

A run records every parameter (flattened ``section.key`` names, values as their YAML/JSON text),
tags for reproduction (git commit and dirty flag, the DVC experiment and stage when run by DVC,
plus whatever the caller adds, e.g. the teacher-cache fingerprint), metrics at steps, system
metrics (CPU, memory, disk, network; GPU when ``nvidia-ml-py`` is installed and a GPU is
present) and artifact folders.

Stages hand the run on through a small JSON file (:func:`write_run_ref` / :func:`read_run_ref`):
``train`` writes it, ``evaluate`` reopens the run with ``start_run(..., run_id=ref.run_id)``.
Lightning logs into the same run through :func:`make_lightning_logger`.

The tracking URI is explicit everywhere (:func:`resolve_tracking_uri`): MLflow 3 has no usable
default for Lightning (it falls back to a file store that MLflow 3 refuses). With the default
SQLite store, artifacts go to ``mlruns/`` next to the database file. Nothing here starts a
server or touches the network at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from distill3r.config import flatten, to_dict
from distill3r.jsonio import read_json, write_json

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # imported lazily at run time: mlflow is slow to import
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

# MLflow 3.17 limits (mlflow.utils.validation): values beyond are rejected or truncated.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250

# Set by DVC in the environment of every stage command (dvc/stage/run.py); the experiment ones
# only under `dvc exp run` (dvc/repo/experiments/queue/base.py). DVC_ROOT is the main
# repository even when a queued or --temp experiment runs in a temporary copy.
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# MLflow 3's UI opens an experiment by its kind: model training, not GenAI
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
DVC_ENV_TAGS = {
    "DVC_EXP_NAME": "dvc.exp_name",
    "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev",
    "DVC_STAGE": "dvc.stage",
}


# ----------------------------------------------------------------------------------------------
# Tracking URI, params and tags
# ----------------------------------------------------------------------------------------------
def default_repo_root() -> Path:
    """The repository the run belongs to: ``$DVC_ROOT`` under DVC, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_tracking_uri(param_uri: str | None, repo_root: str | Path | None = None) -> str:
    """The tracking URI: ``param_uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<repo_root>/mlflow.db`` with an absolute path (``repo_root`` defaults to
    :func:`default_repo_root`, so a queued ``dvc exp run`` still writes to the main repo)."""
    if param_uri:
        return param_uri
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri:
        return env_uri
    return default_store_uri(repo_root)


def default_store_uri(repo_root: str | Path | None = None) -> str:
    """The repository's own store: ``sqlite:///<repo_root>/mlflow.db`` (absolute path)."""
    root = Path(repo_root).resolve() if repo_root is not None else default_repo_root()
    return f"sqlite:///{root / 'mlflow.db'}"


def _value_text(value: Any) -> str:
    """Strings as they are; everything else as JSON (``true``, ``null``, ``[0.9, 0.95]``)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def _check_key(key: str, what: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"MLflow {what} name must have 1..{MAX_KEY_LENGTH} characters: {key!r}")
    return key


def flatten_params(params: Any) -> dict[str, str]:
    """A params dataclass or (nested) dict as MLflow params: ``{"train.lr": "0.0001", ...}``.

    Values longer than MLflow's limit are cut to it (they are in ``params.yaml`` anyway).
    """
    if dataclasses.is_dataclass(params):
        params = to_dict(params)
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dataclass or a mapping, got {type(params).__name__}")
    return {
        _check_key(key, "param"): _value_text(value)[:MAX_PARAM_VALUE_LENGTH]
        for key, value in flatten(dict(params)).items()
    }


def git_tags(repo_root: str | Path | None = None) -> dict[str, str]:
    """``{"mlflow.source.git.commit": sha, "git.dirty": "true"|"false"}``; empty outside a
    git repository. The commit goes under MLflow's own tag (the UI links it), set explicitly
    because MLflow only infers it when the entry point lies inside the repository.

    Dirty means tracked files differ from HEAD (untracked files are ignored, as in
    ``git describe --dirty``).
    """
    root = str(repo_root if repo_root is not None else default_repo_root())

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", root, *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    tags = {GIT_COMMIT_TAG: commit}
    if status is not None:
        tags["git.dirty"] = "true" if status else "false"
    return tags


def dvc_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags from the environment DVC gives a stage command: the experiment name and baseline
    revision under ``dvc exp run``, and the stage name under ``dvc repro`` / ``dvc exp run``."""
    environ = os.environ if environ is None else environ
    return {tag: environ[var] for var, tag in DVC_ENV_TAGS.items() if environ.get(var)}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _env_override(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def sqlite_artifact_location(tracking_uri: str) -> str | None:
    """For ``sqlite:///<dir>/x.db``: ``file://<dir>/mlruns`` (absolute), else ``None``.

    MLflow would put a new experiment's artifacts in ``./mlruns`` of whatever the current
    directory is (a temporary copy under a queued ``dvc exp run``); next to the database they
    survive and ``mlflow ui --backend-store-uri`` finds them.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or len(tracking_uri) == len(prefix):
        return None
    db_path = Path(tracking_uri[len(prefix) :].split("?", 1)[0]).resolve()
    return (db_path.parent / "mlruns").as_uri()


def relocate_sqlite_artifacts(tracking_uri: str) -> int:
    """After a SQLite store moved with its ``mlruns/`` (a moved or copied repository), point
    experiments and runs whose artifacts were beside the database's old place at its new one;
    returns how many experiments moved. MLflow keeps artifact locations as absolute URIs
    (``experiments.artifact_location``, ``runs.artifact_uri``) and has no API to change them,
    so the two columns are rewritten in the database itself; other stores are left alone."""
    import sqlite3

    new = sqlite_artifact_location(tracking_uri)
    db = Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0]) if new else None
    if db is None or not db.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        moved = 0
        for exp_id, old in rows:
            if not old or old == new or not old.startswith("file://") \
                    or not old.rstrip("/").endswith("/mlruns"):
                continue
            con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                        (new, exp_id))
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                        "WHERE experiment_id = ? AND artifact_uri LIKE ? || '%'",
                        (new, len(old) + 1, exp_id, old))
            moved += 1
    if moved:
        log.info("%s: the store moved; artifact locations now under %s", db, new)
    return moved


def _set_experiment(name: str, tracking_uri: str) -> None:
    """Make ``name`` the active experiment, creating it (artifacts by the SQLite file)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    relocate_sqlite_artifacts(tracking_uri)
    if mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=sqlite_artifact_location(tracking_uri))
        except MlflowException:  # created meanwhile by a concurrent run
            if mlflow.get_experiment_by_name(name) is None:
                raise
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


@contextlib.contextmanager
def start_run(
    params: Any,
    tracking_uri: str,
    experiment: str = "distill3r",
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    system_metrics: bool = True,
    system_metrics_interval: float | None = None,
    run_id: str | None = None,
    repo_root: str | Path | None = None,
) -> Iterator["mlflow.ActiveRun"]:
    """Start (or, with ``run_id``, reopen) an MLflow run; yield the active run.

    Args:
        params: a :class:`distill3r.config.Params` (or any params dataclass / nested dict), logged
            flattened; ``None`` logs no params (e.g. when reopening a run).
        tracking_uri: where to log (see :func:`resolve_tracking_uri`); set process-wide.
        experiment: experiment name, created when missing (ignored with ``run_id``).
        tags: extra tags (e.g. ``{"cache.fingerprint": ...}``); they override the automatic
            git/DVC tags of the same name (automatic tags are only set on a new run).
        system_metrics: sample CPU/memory/disk/network (and GPU) in a background thread.
        system_metrics_interval: seconds between samples (MLflow default 10), for this run only.
        run_id: reopen this existing run instead of creating one.
        repo_root: the git repository for the commit tags (default :func:`default_repo_root`).

    The run ends FINISHED, or FAILED when the body raises.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if run_id is None:
        _set_experiment(experiment, tracking_uri)
    # A reopened run (evaluate adding to train's run) keeps the tags of the process that
    # created it; only explicit tags are added.
    auto_tags = {**git_tags(repo_root), **dvc_tags()} if run_id is None else {}
    all_tags = {**auto_tags, **dict(tags or {})}
    interval = None if system_metrics_interval is None else str(float(system_metrics_interval))
    # The monitor reads the interval when the run starts; restore the variable afterwards.
    with _env_override("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", interval):
        active = mlflow.start_run(
            run_id=run_id, run_name=run_name, log_system_metrics=bool(system_metrics)
        )
    with active:
        if all_tags:
            mlflow.set_tags(
                {
                    _check_key(str(k), "tag"): _value_text(v)[:MAX_TAG_VALUE_LENGTH]
                    for k, v in all_tags.items()
                }
            )
        if params is not None:
            mlflow.log_params(flatten_params(params))
        yield active


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log scalar metrics (numbers, 0-d arrays or tensors) to the active run at ``step``."""
    import mlflow

    values = {}
    for key, value in metrics.items():
        try:
            values[_check_key(str(key), "metric")] = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metric {key!r}: not a scalar number: {value!r}") from exc
    mlflow.log_metrics(values, step=step)


def log_artifacts_dir(directory: str | Path, artifact_path: str | None = None) -> None:
    """Upload every file under ``directory`` to the active run, under ``artifact_path``."""
    import mlflow

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: artifact folder not found")
    mlflow.log_artifacts(str(directory), artifact_path=artifact_path)


# ----------------------------------------------------------------------------------------------
# Handing a run on to later stages
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRef:
    """Enough to reopen a run from another process: ``start_run(None, uri, run_id=...)``."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    run_name: str | None = None


def write_run_ref(path: str | Path, run: Any, tracking_uri: str | None = None) -> RunRef:
    """Write ``{"run_id", "experiment_id", "tracking_uri", "run_name"}`` of ``run`` (an
    active run or a ``Run``) as JSON to ``path``; ``tracking_uri`` defaults to MLflow's current.

    The repository's own store (:func:`default_store_uri`) is written as ``null``, so the file
    stays right in a clone or a moved copy of the repository (it is committed with the code);
    :func:`read_run_ref` resolves it again (``$DVC_ROOT`` under DVC, else the DVC repository
    holding the file)."""
    import mlflow

    info = run.info
    ref = RunRef(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        tracking_uri=tracking_uri or mlflow.get_tracking_uri(),
        run_name=info.run_name,
    )
    stored = dataclasses.asdict(ref)
    if ref.tracking_uri == default_store_uri():
        stored["tracking_uri"] = None
    write_json(path, stored)
    return ref


def optional_run_ref(path: str | Path | None) -> RunRef | None:
    """The run reference at ``path`` (:func:`read_run_ref`), or None, logged, when no path is
    given or the file does not exist (the report is then not logged to MLflow)."""
    if path is None:
        return None
    if not Path(path).is_file():
        log.info("%s not found: the report is not logged to MLflow", path)
        return None
    return read_run_ref(path)


def _ref_repo(path: Path) -> Path | None:
    """The repository whose store a ``null`` reference means: ``$DVC_ROOT`` under DVC (as
    :func:`write_run_ref` wrote it: in a queued or ``--temp`` experiment the file lies in a
    temporary copy, the run in the main repository's store), else the DVC repository holding
    the file (a clone or a moved copy)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    return next((d for d in path.resolve().parents if (d / ".dvc").is_dir()), None)


def read_run_ref(path: str | Path) -> RunRef:
    """Read a file written by :func:`write_run_ref` (``ValueError`` naming the file if bad)."""
    raw = read_json(path, "MLflow run reference", "run the train stage first")
    names = {f.name for f in dataclasses.fields(RunRef)}
    missing = sorted({"run_id", "experiment_id", "tracking_uri"} - set(raw))
    unknown = sorted(set(raw) - names)
    if missing or unknown:
        raise ValueError(f"{path}: missing key(s) {missing}, unknown key(s) {unknown}")
    if raw["tracking_uri"] is None:  # the repository's own store
        raw["tracking_uri"] = default_store_uri(_ref_repo(Path(path)))
    for key in ("run_id", "experiment_id", "tracking_uri"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ValueError(f"{path}: {key} must be a non-empty string, got {raw[key]!r}")
    return RunRef(**raw)


def make_lightning_logger(tracking_uri: str, experiment: str, run_id: str) -> "MLFlowLogger":
    """A Lightning ``MLFlowLogger`` that logs into the existing run ``run_id``.

    Create the run with :func:`start_run` on rank 0 and pass its id. Note: Lightning marks the
    run FINISHED when training ends; reopening it (``start_run(..., run_id=...)``) still works.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    if not tracking_uri:
        raise ValueError("make_lightning_logger needs an explicit tracking_uri")
    return MLFlowLogger(
        experiment_name=experiment, tracking_uri=tracking_uri, run_id=run_id, log_model=False
    )


# ----------------------------------------------------------------------------------------------
# Logging a stage's report to the training run
# ----------------------------------------------------------------------------------------------
# Fail fast when the tracking server is down (MLflow's defaults retry for minutes).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def report_metrics(report: dict, prefix: str = "eval") -> dict[str, float]:
    """Numeric leaves of the report as ``{"eval.student.depth_abs_rel": v, ...}`` (nulls,
    strings and booleans dropped; characters MLflow refuses in names become ``_``)."""
    out: dict[str, float] = {}

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{name}.{re.sub(r'[^A-Za-z0-9_./ -]', '_', str(k))}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool) \
                and math.isfinite(node):
            out[name] = float(node)

    walk(report, prefix)
    return out


@contextlib.contextmanager
def _fast_failing_http() -> Iterator[None]:
    added = [k for k in MLFLOW_HTTP_DEFAULTS if k not in os.environ]
    os.environ.update({k: MLFLOW_HTTP_DEFAULTS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def log_report(report: dict, ref: RunRef, prefix: str = "eval") -> str | None:
    """Log a report's numeric leaves (:func:`report_metrics`) to the run of ``ref``; the run
    id, or None (with a warning) when the store cannot be reached or refuses the run."""
    metrics = report_metrics(report, prefix)
    try:
        with _fast_failing_http(), start_run(None, ref.tracking_uri, run_id=ref.run_id,
                                             system_metrics=False):
            log_metrics(metrics)
    except Exception as exc:  # noqa: BLE001 -- any store failure (HTTP, SQL, auth) only warns
        log.warning("MLflow logging to run %s at %s failed (%s: %s); the report is written "
                    "anyway", ref.run_id, ref.tracking_uri, type(exc).__name__, exc)
        return None
    log.info("logged %d metrics to MLflow run %s", len(metrics), ref.run_id)
    return ref.run_id
