"""A testing hook: the node kills itself with SIGKILL at a named point, so tests and the benchmark can
kill it mid-association, mid-inference or mid-send exactly (``CERVSPINE_NODE_CRASH_AT=point:n``, e.g.
``stored:5`` — after the fifth instance is durably stored and acknowledged)."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

CRASH_ENV = "CERVSPINE_NODE_CRASH_AT"
POINTS = ("stored", "scoring", "published", "sent")  # after an instance; inside inference; …
_counts: Counter[str] = Counter()
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """SIGKILL this process at the ``n``-th time ``name`` is reached when the environment asks for it."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    with _lock:
        _counts[name] += 1
        hit = _counts[name] == int(n or 1)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
