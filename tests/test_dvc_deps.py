"""Every package file a stage imports is a dependency of that stage in ``dvc.yaml`` (the root
pipeline's and every study's, ``studies/*/dvc.yaml``, whose deps are relative to its folder).

The import closure is found statically: each stage script and every ``distill3r`` module it
reaches is parsed with :mod:`ast`, and every ``import`` / ``from ... import`` anywhere in the file
(module level, or lazily inside a function) that names a ``distill3r`` module is followed. Parent
packages' ``__init__.py`` files count too, since importing ``a.b`` runs ``a/__init__.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "distill3r"


def _module_file(name: str) -> Path | None:
    """``distill3r.a.b`` -> its file (``a/b.py`` or ``a/b/__init__.py``), or None."""
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(path: Path) -> set[str]:
    """Names of the ``distill3r`` modules ``path`` imports, wherever the import statement is."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    here = _module_name(path) if path.is_relative_to(ROOT / PACKAGE) else ""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here.split(".") if is_package else here.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # ``from pkg import mod`` imports the submodule when one exists
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def import_closure(script: Path, opaque: frozenset[Path] = frozenset()) -> set[Path]:
    """Every file under ``distill3r/`` that running ``script`` may import, as repo paths; the
    files in ``opaque`` are in it, the imports they make are not followed."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path.relative_to(ROOT) in opaque:
            continue
        for name in _imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # parents' __init__ run first
                file = _module_file(".".join(parts[:i]))
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return {p.relative_to(ROOT) for p in seen}


def _covered(file: Path, deps: list[Path]) -> bool:
    return any(file == d or d in file.parents for d in deps)


# The root pipeline's cache stage runs the ground-truth or the Fast3R teacher. A checkpoint
# teacher also runs the student's code, which that stage leaves out of its deps so that a student
# edit never reruns a teacher cache; the checkpoint teacher's fingerprint hashes that code instead
# and the train stage refuses a cache built by other code (tests/test_teachers.py).
OPTIONAL_TEACHERS = {"dvc.yaml:cache": frozenset({Path("distill3r/teachers/checkpoint.py")})}


def _pipelines() -> list[Path]:
    """The root ``dvc.yaml`` and every study's (``studies/*/dvc.yaml``)."""
    return [ROOT / "dvc.yaml", *sorted(ROOT.glob("studies/*/dvc.yaml"))]


def _stages() -> dict[str, tuple[Path, dict]]:
    """``{"<dvc.yaml, repo-relative>:<stage>": (the stages' working directory, stage)}``."""
    out = {}
    for dvc_yaml in _pipelines():
        pipeline = yaml.safe_load(dvc_yaml.read_text())["stages"]
        for name, stage in pipeline.items():
            wdir = (dvc_yaml.parent / stage.get("wdir", ".")).resolve()
            out[f"{dvc_yaml.relative_to(ROOT)}:{name}"] = (wdir, stage)
    return out


def _repo_deps(wdir: Path, stage: dict) -> list[Path]:
    """The stage's deps as repository-relative paths (deps outside the repository dropped)."""
    paths = [(wdir / str(d)).resolve() for d in stage["deps"]]
    return [p.relative_to(ROOT) for p in paths if p.is_relative_to(ROOT)]


def _stage_script(deps: list[Path]) -> Path:
    scripts = [d for d in deps if d.parts[0] == "stages" and d.suffix == ".py"]
    assert len(scripts) == 1, f"expected one stages/*.py dependency, got {scripts}"
    return ROOT / scripts[0]


def test_studies_are_checked():
    assert "studies/distill/dvc.yaml:train_student" in _stages()


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_cover_import_closure(name):
    wdir, stage = _stages()[name]
    deps = _repo_deps(wdir, stage)
    closure = import_closure(_stage_script(deps), OPTIONAL_TEACHERS.get(name, frozenset()))
    missing = sorted(str(f) for f in closure if not _covered(f, deps))
    assert not missing, f"stage {name}: dvc.yaml deps miss imported file(s): {', '.join(missing)}"


def test_closure_follows_lazy_and_relative_imports(tmp_path):
    """The walker itself: a lazy import inside a function is followed, recursively."""
    closure = import_closure(ROOT / "stages" / "cache.py")  # imports the package inside main()
    assert Path("distill3r/cache/writer.py") in closure
    assert Path("distill3r/config.py") in closure
    assert Path("distill3r/geometry.py") in closure  # via the ground-truth teacher


def test_teacher_cache_does_not_depend_on_the_student():
    """Editing the student (a config, the heads) leaves the root pipeline's teacher cache as it
    is: its stage neither lists nor imports distill3r/models, unless through the checkpoint
    teacher, whose own imports are the only way in."""
    wdir, stage = _stages()["dvc.yaml:cache"]
    deps = _repo_deps(wdir, stage)
    script = _stage_script(deps)
    student = list((ROOT / "distill3r" / "models").rglob("*.py"))
    assert not [f for f in student if _covered(f.relative_to(ROOT), deps)]
    assert not [f for f in import_closure(script, OPTIONAL_TEACHERS["dvc.yaml:cache"])
                if f.parts[:2] == ("distill3r", "models")]
    assert Path("distill3r/models/student.py") in import_closure(script)  # the checkpoint teacher
