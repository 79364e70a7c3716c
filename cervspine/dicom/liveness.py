"""The node's loops, none of which may die silently: each runs one step at a time in its own thread; an
error in a step is logged with its traceback, counted, and followed by a capped, doubling pause before the
next step. Each loop reports when it last ran, when it last did work and what last went wrong (the status
page, ``/status.json`` and ``/health`` show it)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Loop:
    """``step()`` repeated until ``stop`` is set: True = it did some work (go on at once), False = nothing
    to do (wait ``idle_s``). ``step_limit_s``: one step running longer than this makes the loop *stalled*."""

    def __init__(
        self,
        name: str,
        step: Callable[[], bool],
        stop: threading.Event,
        *,
        idle_s: float = 0.2,
        backoff_max_s: float = 60.0,
        step_limit_s: float = 600.0,
    ):
        self.name, self.step, self._stop = name, step, stop
        self.idle_s, self.backoff_max_s, self.step_limit_s = float(idle_s), float(backoff_max_s), step_limit_s
        self.started = time.time()
        self.last_beat = self.last_progress = None
        self.in_step_since: float | None = None
        self.errors_in_a_row = self.errors = 0
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"cervspine-{name}", daemon=True)

    def start(self) -> Loop:
        self.thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def backoff(self) -> float:
        return min(self.backoff_max_s, 0.5 * 2 ** max(0, self.errors_in_a_row - 1))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.in_step_since = time.time()
            try:
                did_work = bool(self.step())
            except BaseException as e:  # noqa: BLE001 — the loop outlives any step (SystemExit included)
                self.errors += 1
                self.errors_in_a_row += 1
                self.last_error = f"{type(e).__name__}: {e}"
                wait = self.backoff()
                log.exception("%s loop: step failed (%d in a row; next in %.1f s)", self.name,
                              self.errors_in_a_row, wait)  # fmt: skip
                self.in_step_since = None
                self.last_beat = time.time()
                self._stop.wait(wait)
                continue
            self.in_step_since = None
            self.last_beat = time.time()
            self.errors_in_a_row = 0
            if did_work:
                self.last_progress = self.last_beat
            else:
                self._stop.wait(self.idle_s)

    def info(self, now: float | None = None) -> dict[str, Any]:
        """Liveness for the status page: alive, stalled (one step over ``step_limit_s``), the times."""
        now = time.time() if now is None else now
        busy = self.in_step_since
        stalled = busy is not None and now - busy > self.step_limit_s
        return {
            "name": self.name,
            "alive": self.thread.is_alive(),
            "stalled": bool(stalled),
            "last_beat": self.last_beat,
            "last_progress": self.last_progress,
            "in_step_since": busy,
            "errors": self.errors,
            "errors_in_a_row": self.errors_in_a_row,
            "last_error": self.last_error,
        }


def health(loops: list[dict[str, Any]], stopping: bool = False) -> dict[str, Any]:
    """``/health``: ok when every loop is alive and none is stalled; else the names of those that are not."""
    problems = [f"{t['name']}: not running" for t in loops if not t["alive"]]
    problems += [f"{t['name']}: one step running for too long" for t in loops if t["alive"] and t["stalled"]]
    if stopping:
        problems.append("node: stopping")
    return {"ok": not problems, "problems": problems}
