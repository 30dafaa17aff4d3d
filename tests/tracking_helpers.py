"""MLflow look-ups the tests use to check what a run recorded (not needed by the pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def download_artifacts(
    run_id: str, artifact_path: str, dst_dir: str | Path, tracking_uri: str
) -> Path:
    """Download a run's artifact (file or folder) into ``dst_dir``; return the local path."""
    from mlflow.tracking import MlflowClient

    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    local = MlflowClient(tracking_uri).download_artifacts(run_id, artifact_path, str(dst_dir))
    return Path(local)


def find_run(
    tracking_uri: str,
    experiment: str = "distill3r",
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> "object | None":
    """The newest run of ``experiment`` whose tags (and name) match exactly, or ``None``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None

    def quoted(text: str) -> str:
        return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"

    clauses = [f"tags.`{key}` = {quoted(value)}" for key, value in (tags or {}).items()]
    if run_name is not None:
        clauses.append(f"attributes.run_name = {quoted(run_name)}")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None
