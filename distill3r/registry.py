"""The trained student in MLflow's model registry.

``train`` registers the student folder it logged to its run (artifact ``student``:
``model.safetensors`` + ``config.json``) as a new version of the registered model named by
``train.registered_model`` (default ``distill3r-student``; null: no registration). The version's
source is ``runs:/<run id>/student`` (it follows the run's artifacts wherever the store keeps
them) and its tags name the run, the teacher-cache fingerprint and the model variant.
``evaluate`` later tags every version of its run with the headline metrics
(``eval.<name>``, the values of ``reports/metrics.json``).

``mlflow.artifacts.download_artifacts("models:/distill3r-student/<version>")`` (or the UI's
Models page) brings the student back.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from distill3r.tracking import RunRef

log = logging.getLogger(__name__)

ARTIFACT = "student"


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def register_student(tracking_uri: str, run_id: str, name: str,
                     tags: Mapping[str, Any] | None = None) -> str:
    """Register ``runs:/<run_id>/student`` as a new version of ``name`` (created when
    missing), tagged with ``run_id`` and ``tags``; returns the version (e.g. ``"3"``)."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.create_registered_model(
            name, description="Distill3R student (model.safetensors + config.json); load it "
            "with distill3r.models.load_student")
    except MlflowException:
        if client.get_registered_model(name) is None:  # pragma: no cover - raises instead
            raise
    version = client.create_model_version(
        name, f"runs:/{run_id}/{ARTIFACT}", run_id=run_id,
        tags={"run_id": run_id, **{str(k): str(v) for k, v in (tags or {}).items()}})
    log.info("registered %s version %s (run %s)", name, version.version, run_id)
    return str(version.version)


def versions_of_run(tracking_uri: str, run_id: str) -> list:
    """The registered model versions whose source run is ``run_id`` (any model name)."""
    return list(_client(tracking_uri).search_model_versions(f"run_id = '{run_id}'"))


def tag_run_versions(ref: RunRef, metrics: Mapping[str, float | None],
                     prefix: str = "eval") -> list[str]:
    """Tag every version registered from ``ref``'s run with ``<prefix>.<metric>`` (nulls are
    skipped); returns ``["name/version", ...]``, empty (with a warning) when the store cannot be
    reached."""
    try:
        client = _client(ref.tracking_uri)
        tagged = []
        for mv in versions_of_run(ref.tracking_uri, ref.run_id):
            for key, value in metrics.items():
                if value is not None:
                    client.set_model_version_tag(mv.name, mv.version, f"{prefix}.{key}",
                                                 str(value))
            tagged.append(f"{mv.name}/{mv.version}")
    except Exception as exc:  # noqa: BLE001 -- any store failure only warns, as log_report
        log.warning("tagging the model versions of run %s at %s failed (%s: %s)", ref.run_id,
                    ref.tracking_uri, type(exc).__name__, exc)
        return []
    return tagged
