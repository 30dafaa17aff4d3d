"""How a stage process uses the CPU: the OpenMP waiting policy and the torch thread count.

On a CPU shared with other programs, OpenMP threads that outnumber the free cores and spin-wait
at every barrier slow each step down many times (on a 2-core machine, demo training fell from
5.5 to under 1 sample/s next to one busy process). Two rules avoid that:

- ``runtime.omp_wait_policy: auto``: ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep
  instead of spinning) only when other programs keep a core busy as the stage starts
  (:func:`busy_cores`); on a quiet machine OpenMP's own default (spin a while, then sleep)
  is left alone, because sleeping at every barrier of thousands of small kernels costs far
  more than it saves there. ``passive`` / ``active`` force a policy. OpenMP reads it once, when
  torch is imported, so :func:`configure_environment` runs before the first ``import torch``;
  a value already in the environment wins. The policy never changes the results, only the
  speed.
- ``runtime.threads`` torch threads, or with null the cores this process may use
  (``os.sched_getaffinity``), divided by the processes sharing the node (CPU DDP ranks). With
  ``runtime.adapt_to_load`` the other programs running at the start (the kernel's count of
  runnable tasks, ``/proc/loadavg``) are subtracted first, at least 1.

Measured on the 2-core machine (one training step of the demo student, batch 4 x 4 views at
112x112, bf16, 2 threads): 0.40 s quiet with OpenMP's default, 0.71 s quiet with PASSIVE (so
the old fixed ``passive`` made demo training 1.8x slower), 0.48 s quiet with ACTIVE; beside one
busy process 3.4 s with the default, 1.75 s with PASSIVE, 1.5-1.6 s with ACTIVE. Adapting to
the load (1 thread) keeps 80% of the unloaded throughput there (``scripts/load_throughput.py``).
Adapting is off by default because the thread count changes the order of floating-point
reductions: the same commit and params would then train different weights on a
busy and on a quiet machine, while a fixed count trains bit-identical ones.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from distill3r.config import RuntimeParams

log = logging.getLogger(__name__)

_LOADAVG = Path("/proc/loadavg")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval_s: float = 0.02) -> int:
    """Runnable tasks other than this one (median of a few reads of ``/proc/loadavg``'s
    ``running/total`` field, which counts the reader itself); 0 where it is not readable."""
    counts = []
    for i in range(samples):
        try:
            running = int(_LOADAVG.read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval_s)
    return sorted(counts)[len(counts) // 2]


def choose_threads(threads: Optional[int], processes: int = 1,
                   adapt_to_load: bool = False) -> int:
    """``threads`` if set, else the cores (the idle ones with ``adapt_to_load``) divided
    between ``processes`` (at least 1)."""
    if threads is not None:
        return threads
    cores = available_cores()
    if adapt_to_load:
        cores = max(1, cores - busy_cores())
    return max(1, cores // max(1, processes))


def wait_policy(choice: str) -> Optional[str]:
    """The ``OMP_WAIT_POLICY`` value for ``runtime.omp_wait_policy`` (None: leave OpenMP's
    default): ``auto`` is ``PASSIVE`` while other programs keep a core busy, else None."""
    if choice == "auto":
        busy = busy_cores()
        if busy == 0:
            return None
        log.warning("%d other runnable task(s) as this stage started: OMP_WAIT_POLICY=PASSIVE "
                    "(idle OpenMP threads sleep at every barrier; if the machine is quiet "
                    "after all, up to 1.8x slower than OpenMP's default). Rerun on a quiet "
                    "machine, or set runtime.omp_wait_policy: active", busy)
        return "PASSIVE"
    return choice.upper()


def configure_environment(params: RuntimeParams) -> Optional[str]:
    """Set ``OMP_WAIT_POLICY`` (:func:`wait_policy`) for this process and its children unless
    already set (call before torch is imported; later it has no effect on this process);
    returns the policy in effect (None: OpenMP's default)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    policy = wait_policy(params.omp_wait_policy)
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy
    return policy


def apply_threads(params: RuntimeParams, processes: int = 1) -> int:
    """Set torch's intra-op thread count (:func:`choose_threads`); returns it."""
    import torch

    count = choose_threads(params.threads, processes, params.adapt_to_load)
    torch.set_num_threads(count)
    return count
