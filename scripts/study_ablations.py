"""The published ablations of the learned-teacher study as queued DVC experiments, and their table.

    python scripts/study_ablations.py                 # queue, run one at a time, tabulate
    python scripts/study_ablations.py --collect [--rev COMMIT ...]   # only tabulate finished ones
    python scripts/study_ablations.py --prefix smoke- --set train.max_steps=20 ...  # toy scale

Queues one experiment of ``studies/distill`` per configuration (:data:`ABLATIONS`: confidence
weighting from the teacher (the main configuration, two seeds), no weighting, the student's own
confidence, no confidence supervision, the teacher's weighting at ``loss.conf_scale`` 30), with
``--set`` overrides added to every one, runs the queue with one worker (``dvc queue start -j 1``:
one training at a time on a CPU) and waits for it. The stages an ablation does not change (teacher, renders, caches) come from DVC's run cache,
so run the study once first (``make study``). Then it reads every experiment of that name from
``dvc exp show`` and writes the comparison (``distill3r.study.ablation_table``, mean ± std over
the seeds) to ``studies/distill/reports/ablations.md``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from distill3r.atomic import replacing
from distill3r.study import ablation_table

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "distill"
PARAMS = "params.yaml"  # as `dvc exp show` of the study project names it

# name -> the study params.yaml overrides (everything else is the main configuration)
ABLATIONS: dict[str, list[str]] = {
    "main-s0": [],
    "main-s1": ["train.seed=1"],
    "weight-none": ["loss.weighting=none"],
    "weight-student": ["loss.weighting=student"],
    "no-conf": ["loss.gamma_conf=0"],
    # the learned teacher's confidences sit above the default conf_scale (10) almost everywhere,
    # which clamps its weights to 1 (= no weighting): a scale near its upper range makes them act
    "weight-teacher-cs30": ["loss.conf_scale=30"],
}
CONFIG_KEYS = ("loss.weighting", "loss.gamma_conf", "loss.conf_scale")


def _dvc(*args: str, capture: bool = False) -> str:
    done = subprocess.run(["dvc", *args], cwd=STUDY, check=True, text=True,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def queue(prefix: str, extra: list[str]) -> list[str]:
    """Queue every ablation; an earlier experiment of the same name is removed first (not
    ``dvc exp run --force``, which would also rerun every stage, run cache or not)."""
    names = []
    for name, overrides in ABLATIONS.items():
        subprocess.run(["dvc", "exp", "remove", prefix + name], cwd=STUDY, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sets = [a for s in [*extra, *overrides] for a in ("-S", s)]
        _dvc("exp", "run", "--queue", "-n", prefix + name, *sets)
        names.append(prefix + name)
    return names


def run_queue(poll_s: float = 30.0) -> None:
    """Start one queue worker and wait until nothing is queued or running."""
    _dvc("queue", "start", "-j", "1")
    while True:
        time.sleep(poll_s)
        status = _dvc("queue", "status", capture=True)
        if not any(word in status for word in ("Queued", "Running")):
            return


def _value(row: dict, key: str, file: str | None = None):
    if file is not None and f"{file}:{key}" in row:
        return row[f"{file}:{key}"]
    if key in row:
        return row[key]
    matches = [v for k, v in row.items() if k.endswith(f":{key}")]
    return matches[0] if len(matches) == 1 else None


def head() -> str:
    """The commit experiments queued now are based on."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, text=True,
                          stdout=subprocess.PIPE).stdout.strip()


def collect(names: list[str], revs: list[str]) -> list[dict]:
    """The finished experiments named ``names`` of the baseline commits ``revs`` as
    :func:`ablation_table` runs (a name found under several baselines: the first rev's)."""
    import dvc.api

    metrics = ("student.abs_rel", "student.chamfer", "student.rra15", "student.maa30",
               "student_vs_teacher.abs_rel", "student_vs_teacher.chamfer", "student.train_s",
               "student.params_m", "teacher.abs_rel")
    runs, seen = [], set()
    for row in dvc.api.exp_show(repo=str(STUDY), revs=revs):  # the study project
        if row.get("Experiment") not in names or row["Experiment"] in seen:
            continue
        seen.add(row["Experiment"])
        runs.append({
            "name": row["Experiment"],
            "params": {k: _value(row, k, PARAMS) for k in (*CONFIG_KEYS, "train.seed")},
            "metrics": {k: _value(row, k) for k in metrics},
        })
    return sorted(runs, key=lambda r: names.index(r["name"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="", help="experiment name prefix (e.g. smoke-)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a `dvc exp run -S` override for every experiment (repeatable)")
    parser.add_argument("--collect", action="store_true",
                        help="only tabulate the finished experiments")
    parser.add_argument("--rev", action="append", default=[],
                        help="with --collect: a baseline commit of the experiments, repeatable "
                        "(default HEAD; `dvc exp list --all-commits` lists them)")
    parser.add_argument("--out", default=str(STUDY / "reports" / "ablations.md"))
    args = parser.parse_args(argv)
    names = [args.prefix + n for n in ABLATIONS]
    revs = args.rev or [head()]  # queued now: based on this commit, wherever HEAD moves meanwhile
    if not args.collect:
        queue(args.prefix, args.set)
        run_queue()
    runs = collect(names, revs)
    if not runs:
        print(f"no finished experiment named {', '.join(names)} based on {', '.join(revs)}",
              file=sys.stderr)
        return 1
    table = ablation_table(runs, CONFIG_KEYS)
    with replacing(args.out) as tmp:
        tmp.write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
