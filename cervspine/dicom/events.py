"""Refusal events without a flood of writes: the first refusal under a key (by default its kind, subject
and detail; for connections and associations the peer's address) in each ``every_s`` window is written at
once; the ones after it in the window are counted in memory and written as one event ("… and N more like
it") when the window ends (:meth:`EventLimiter.flush`, called by the scheduler). Beyond ``per_window``
written events in a window (many peers at once) the rest are folded under one key per kind. A peer that
opens a thousand connections costs a handful of rows, not a thousand fsyncs."""

from __future__ import annotations

import threading
import time
from collections import deque

from cervspine.dicom.queue import JobQueue


class EventLimiter:
    """Writes events to ``queue``, at most one per (kind, subject) per ``every_s`` plus a count."""

    def __init__(self, queue: JobQueue, every_s: float = 60.0, per_window: int = 120):
        self.queue, self.every_s, self.per_window = queue, float(every_s), int(per_window)
        self._windows: dict[tuple, list] = {}  # key → [window start, held count, last detail, kind, subject]
        self._written: deque[float] = deque()
        self._lock = threading.Lock()

    def event(self, kind: str, subject: str, detail: str, key: tuple | None = None) -> bool:
        """Record one event; True if it was written now (False: counted, written with the window's end)."""
        now = time.time()
        key = (kind, subject, detail) if key is None else (kind, *key)
        with self._lock:
            while self._written and now - self._written[0] >= self.every_s:
                self._written.popleft()
            if key not in self._windows and len(self._written) >= self.per_window:
                key, subject = (kind, "(many)"), "(many)"
                detail = f"{detail} [more than {self.per_window} events a window: folded]"
            window = self._windows.get(key)
            if window is not None and now - window[0] < self.every_s:
                window[1] += 1
                window[2] = detail
                return False
            held = self._windows.pop(key, None)
            self._windows[key] = [now, 0, detail, kind, subject]
            self._written.append(now)
        if held and held[1]:
            self._write_held(held)
        self.queue.event(kind, subject, detail)
        return True

    def _write_held(self, window: list) -> None:
        n, detail, kind, subject = window[1:]
        self.queue.event(
            kind, subject, f"{detail} (and {n} more like it within {self.every_s:.0f} s)", count=n
        )

    def flush(self, force: bool = False) -> int:
        """Write the counts of windows that have ended (all of them with ``force``); returns how many."""
        now = time.time()
        with self._lock:
            ended = [k for k, w in self._windows.items() if force or now - w[0] >= self.every_s]
            done = [self._windows.pop(k) for k in ended]
        for window in done:
            if window[1]:
                self._write_held(window)
        return len(done)
