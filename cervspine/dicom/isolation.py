"""Where a series is decoded and scored: in a worker process (the default), so that a decoder that crashes,
a series that eats all memory (the worker has a data limit, RLIMIT_DATA) or a step that hangs
(``timeout_s``) kills or stalls the worker — never the node, which counts the attempt and starts a fresh
worker; or in the node's own process (tests, one-off runs).

Both raise :class:`ScoringError` with a *kind*: ``input`` (the series cannot be read: refused for good),
``node`` (nothing to do with the series — disk full, models that do not load: retried, not counted
against it) or ``series`` (anything else, MemoryError and crashes included: retried, counted; after
``attempts`` of them the series is quarantined).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from cervspine.dicom.spool import Spool
from cervspine.dicom.worker import ModelsUnavailable, Scorer
from cervspine.io.errors import CervspineInputError

log = logging.getLogger(__name__)
NODE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class ScoringError(Exception):
    """A series was not scored; ``kind``: ``input``, ``node`` or ``series`` (see :mod:`.isolation`)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def classify(e: BaseException) -> str:
    if isinstance(e, CervspineInputError):
        return "input"
    if isinstance(e, ModelsUnavailable) or (isinstance(e, OSError) and e.errno in NODE_ERRNOS):
        return "node"
    return "series"


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class InProcessScoring:
    """Scoring in the node's own process (a crash there is the node's)."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def warm_up(self) -> None:
        self.scorer.warm_up()

    @property
    def synthetic_if_known(self) -> bool | None:
        return self.scorer.synthetic_if_known

    def score(self, series_uid: str, content_hash: str, earlier: list[str]) -> dict[str, Any]:
        try:
            return self.scorer.score(series_uid, content_hash, earlier)
        except Exception as e:  # MemoryError included
            raise ScoringError(classify(e), _reason(e)) from e

    def close(self) -> None:
        pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that started it (in the node) goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(conn, spool_root: str, factory, thresholds, synthetic, memory_bytes: int | None) -> None:
    """The worker process: load the models, then score what the node asks, one series at a time; after a
    ``series`` error it exits (the node starts a fresh one: no state left over from a poison series)."""
    import resource

    _die_with_parent()
    parent = os.getppid()
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] worker: %(message)s"
    )
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    scorer = Scorer(Spool(spool_root), factory, thresholds, synthetic)
    scorer.node_pid = parent
    try:
        conn.send(("ready", scorer.synthetic, None))
    except Exception as e:  # the models: reported with the first series, which is not to blame
        conn.send(("ready", None, _reason(e)))
    while os.getppid() == parent:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            conn.send(("ok", scorer.score(*request)))
        except BaseException as e:  # noqa: BLE001 — MemoryError included: the node decides what it means
            kind, reason = classify(e), _reason(e)
            if isinstance(e, MemoryError):
                limit = f"its data limit of {memory_bytes >> 20} MiB" if memory_bytes else "no limit set"
                reason = f"MemoryError: the worker ran out of memory ({limit})"
            conn.send(("error", kind, reason))
            if kind == "series":
                return


class WorkerProcessScoring:
    """Scoring in a spawned worker process with a data-memory limit (``memory_mb``; None: none) and a
    deadline per series (``timeout_s``). ``factory`` must pickle (e.g. a ``functools.partial``)."""

    def __init__(
        self,
        spool: Spool,
        factory: Callable[[], Any],
        thresholds,
        synthetic: bool | None,
        *,
        memory_mb: int | None,
        timeout_s: float,
    ):
        self.spool, self.factory, self.thresholds, self.synthetic = spool, factory, thresholds, synthetic
        self.memory_bytes = None if memory_mb is None else int(memory_mb) << 20
        self.timeout_s = float(timeout_s)
        self._proc = self._conn = None
        self._models_error: str | None = None
        self._lock = threading.Lock()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        mine, theirs = ctx.Pipe()
        args = (
            theirs,
            str(self.spool.root),
            self.factory,
            self.thresholds,
            self.synthetic,
            self.memory_bytes,
        )
        self._proc = ctx.Process(target=_worker_main, args=args, name="cervspine-scoring-worker", daemon=True)
        self._proc.start()
        theirs.close()
        self._conn = mine
        log.info("scoring worker started (pid %d)", self._proc.pid)

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def warm_up(self) -> None:
        with self._lock:
            if not self._alive():
                self._start()

    @property
    def synthetic_if_known(self) -> bool | None:
        return self.synthetic

    def _reply(self, deadline: float) -> tuple[Any, str]:
        """(the worker's answer to a request, "") — a ``ready`` note on the way is taken in — or (None,
        why there is none: "died" or "timeout")."""
        while time.monotonic() < deadline:
            try:
                if self._conn.poll(0.2):
                    message = self._conn.recv()
                    if message[0] == "ready":
                        self.synthetic = message[1] if self.synthetic is None else self.synthetic
                        self._models_error = message[2]
                        continue
                    return message, ""
            except (EOFError, OSError):
                return None, "died"
            if not self._proc.is_alive():
                return None, "died"
        return None, "timeout"

    def _end(self) -> str:
        """Stop the worker (killed if need be); how it ended."""
        proc, self._proc = self._proc, None
        if proc is None:
            return "not running"
        proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
        code = proc.exitcode
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if code is not None and code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exit code {code}"

    def score(self, series_uid: str, content_hash: str, earlier: list[str]) -> dict[str, Any]:
        with self._lock:
            if not self._alive():
                self._start()
            with contextlib.suppress(OSError, ValueError):  # it died meanwhile: no answer will come
                self._conn.send((series_uid, content_hash, list(earlier)))
            reply, why = self._reply(time.monotonic() + self.timeout_s)
            if reply is None:
                how = self._end()
                what = f"no answer within {self.timeout_s:.0f} s" if why == "timeout" else "the worker died"
                raise ScoringError("series", f"WorkerCrash: {what} while scoring this series ({how})")
            if reply[0] == "ok":
                return reply[1]
            _, kind, reason = reply
            if kind == "series":
                self._end()
            raise ScoringError(kind, reason)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._conn.send(None)
            self._end()
