"""A testing hook: faults injected at named points, so tests and the benchmark can kill the node
mid-association, mid-inference or mid-send exactly, or make one series poison
(``CERVSPINE_NODE_CRASH_AT=point:n[@subject][,point:n[@subject] …]``, e.g. ``stored:5`` — SIGKILL after
the fifth instance is durably stored and acknowledged; ``decoding:1@<series UID>`` — every attempt at
that series crashes its worker, each a fresh process).

Points: ``stored`` (after an instance), ``scoring`` (inside inference: the node is killed, also when the
scoring runs in a worker process), ``decoding`` (before the series is decoded: the process that decodes
it is killed — the worker process where scoring is isolated, so the node lives), ``memory`` (before the
series is decoded: the decoding process asks for more memory than its limit allows), ``published``,
``sent``. With ``@subject`` only calls for that subject (a series UID) count.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

CRASH_ENV = "CERVSPINE_NODE_CRASH_AT"
POINTS = ("stored", "scoring", "decoding", "memory", "published", "sent")
MEMORY_BOMB_BYTES = 1 << 36  # asked for at ``memory`` by a process without a memory limit (64 GiB)
_counts: Counter[str] = Counter()
_lock = threading.Lock()


def fault_due(name: str, subject: str = "") -> bool:
    """Whether the environment asks for the fault ``name`` now (the ``n``-th matching call)."""
    for spec in os.environ.get(CRASH_ENV, "").split(","):
        point, _, rest = spec.strip().partition(":")
        n, _, target = rest.partition("@")
        if point != name or (target and target != subject):
            continue
        with _lock:
            _counts[spec] += 1
            return _counts[spec] == int(n or 1)
    return False


def crash_point(name: str, subject: str = "", node_pid: int | None = None) -> None:
    """SIGKILL this process (and ``node_pid`` first, when it is another one) at the ``n``-th time ``name``
    is reached, when the environment asks for it."""
    if fault_due(name, subject):
        if node_pid is not None and node_pid != os.getpid():
            os.kill(node_pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def memory_point(subject: str = "") -> None:
    """When the environment asks for the ``memory`` fault: ask for as many bytes at once as this
    process's data limit (RLIMIT_DATA) allows in all — a MemoryError where a limit is set — or for
    :data:`MEMORY_BOMB_BYTES` where none is."""
    if fault_due("memory", subject):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
        bomb = bytearray(MEMORY_BOMB_BYTES if soft == resource.RLIM_INFINITY else soft)
        del bomb
