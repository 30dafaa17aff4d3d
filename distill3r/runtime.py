"""How a stage process uses the CPU: the OpenMP waiting policy and the torch thread count.

On a CPU shared with other programs, OpenMP threads that outnumber the free cores and spin-wait
at every barrier slow each step down many times (on a 2-core machine, demo training fell from
5.5 to under 1 sample/s next to one busy process). Two rules avoid that:

- ``OMP_WAIT_POLICY=PASSIVE`` (``runtime.omp_wait_policy``): idle OpenMP threads sleep instead of
  spinning. OpenMP reads it once, when torch is imported, so :func:`configure_environment` runs
  before the first ``import torch``; a value already in the environment wins.
- ``runtime.threads`` torch threads, or with null the cores this process may use
  (``os.sched_getaffinity``), divided by the processes sharing the node (CPU DDP ranks). With
  ``runtime.adapt_to_load`` the other programs running at the start (the kernel's count of
  runnable tasks, ``/proc/loadavg``) are subtracted first, at least 1.

Measured on the 2-core machine (``scripts/load_throughput.py``, demo training beside one busy
process): 48% of the unloaded throughput with 2 threads and the passive policy, 80% adapting to
the load (1 thread). Adapting is off by default because the thread count changes the order of
floating-point reductions: the same commit and params would then train different weights on a
busy and on a quiet machine, while a fixed count trains bit-identical ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from distill3r.config import RuntimeParams

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


def configure_environment(params: RuntimeParams) -> None:
    """Set ``OMP_WAIT_POLICY`` for this process and its children unless already set (call
    before torch is imported; later it has no effect on this process)."""
    os.environ.setdefault("OMP_WAIT_POLICY", params.omp_wait_policy.upper())


def apply_threads(params: RuntimeParams, processes: int = 1) -> int:
    """Set torch's intra-op thread count (:func:`choose_threads`); returns it."""
    import torch

    count = choose_threads(params.threads, processes, params.adapt_to_load)
    torch.set_num_threads(count)
    return count
