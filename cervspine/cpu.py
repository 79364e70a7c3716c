"""CPU threads for inference, chosen once at start-up (torch-free: the torch runtime and a bundle's use it).

``num_threads=auto`` (the predict/serve/evaluate default) takes one thread per core that is free when the
models are loaded: the cores this process may use minus how busy the machine is (the larger of the
1-minute load average and the tasks running right now, this one excepted), at least 1. On an idle
machine that is every core; on a shared 2-core box with another busy process it is 1 — there the intra-op
threads of torch (or ONNX Runtime) would wait on each other's time slices, which made predict 5.5× slower
with two threads than with one (experiments/benchmarks, bench rows "threads").
"""

from __future__ import annotations

import math
import os
from pathlib import Path

AUTO = "auto"


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask; else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """How many cores other work keeps busy: max(1-minute load average, running tasks − 1)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    running = 0
    try:  # the 4th field of /proc/loadavg: "running/total" scheduling entities right now
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, IndexError, ValueError):
        running = 0
    return max(float(load), float(running), 0.0)


def auto_threads(cores: int | None = None, busy: float | None = None) -> int:
    """One thread per free core (rounded), between 1 and ``cores``."""
    cores = usable_cores() if cores is None else int(cores)
    busy = busy_cores() if busy is None else float(busy)
    return int(max(1, min(cores, math.floor(cores - busy + 0.5))))


def resolve_threads(setting: int | str | None) -> int | None:
    """``"auto"`` → :func:`auto_threads` now; an int (or its string) → itself (≥ 1); None → None (the
    runtime's own default)."""
    if setting is None:
        return None
    if isinstance(setting, str):
        if setting.strip().lower() == AUTO:
            return auto_threads()
        setting = int(setting)
    return max(1, int(setting))
