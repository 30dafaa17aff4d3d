"""JSON files of the pipeline: read with errors that name the file, write atomically.

Every report, index and sidecar the stages write goes through :func:`write_json`, so an
interrupted run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill3r.atomic import replacing


def read_json(path: str | Path, what: str = "JSON file", hint: str = "") -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file if it is missing (``what``
    not found, plus ``hint``), not JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} not found" + (f" ({hint})" if hint else ""))
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc!r}") from exc
    except OSError as exc:
        raise ValueError(f"{path}: {what} unreadable: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def write_json(path: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False,
               allow_nan: bool = True) -> Path:
    """Write ``obj`` as JSON (newline-terminated) through a temporary file and a rename."""
    path = Path(path)
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n"
    with replacing(path, fsync=True) as tmp:
        tmp.write_text(text)
    return path
