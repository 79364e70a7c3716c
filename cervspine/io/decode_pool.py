"""Decoding slices for :func:`cervspine.io.dicom.load_study`: in this process, or in a pool of decoder
subprocesses (:mod:`cervspine.io.decode_worker`).

:func:`decode_local` decodes in this process (numpy for native data, pydicom); :func:`decode_remote`
feeds jobs to reusable worker subprocesses and reads each decoded slice straight into the output array;
whatever a dying worker leaves undone is reported so that the caller can decode it again with pydicom
here (:func:`decode_again_with_pydicom`). The pool is per process (a forked child starts its own) and is
stopped at exit or by :func:`shutdown`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from cervspine.io import decode_worker
from cervspine.io.decode_worker import ANSWER, OK, OVERFLOW, REQUEST, SliceJob, decode_into, recoverable

CRASH_TEST_ENV = "CERVSPINE_DECODER_CRASH_TEST"  # testing hook: a file name (or "*") kills the worker
ANSWER_TIMEOUT_S = 120.0
WORKER_SCRIPT = decode_worker.__file__  # run by path: the worker never imports cervspine


@dataclass
class Outcome:
    """Slots whose decode failed (with reasons), overflowed int16, or died with their worker."""

    errors: dict[int, str] = field(default_factory=dict)
    overflow: list[SliceJob] = field(default_factory=list)
    crashed: list[SliceJob] = field(default_factory=list)
    retry: list[SliceJob] = field(default_factory=list)  # failed in a worker with dicomsdl


def decode_local(jobs: Sequence[SliceJob], out: np.ndarray, threads: int, outcome: Outcome) -> None:
    """Decode in this process; threads help for "raw" (numpy releases the GIL), not for pydicom."""

    def run(job: SliceJob) -> None:
        try:
            if not decode_into(job, out[job.slot]):
                outcome.overflow.append(job)
        except BaseException as exc:  # noqa: BLE001 - recorded, the policy decides
            if not recoverable(exc):
                raise
            outcome.errors[job.slot] = f"{type(exc).__name__}: {exc}"

    if threads > 1 and len(jobs) > 8:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, jobs, chunksize=16))
    else:
        for job in jobs:
            run(job)


class Worker:
    """One decoder subprocess speaking the :mod:`~cervspine.io.decode_worker` pipe protocol."""

    BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.BOOT, WORKER_SCRIPT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        with contextlib.suppress(Exception):  # bigger pipe: fewer wake-ups per 512 KiB slice (Linux)
            import fcntl

            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, request: dict) -> None:
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(REQUEST.pack(len(data)) + data)
        while view:
            view = view[self.proc.stdin.write(view) :]

    def _wait_readable(self) -> None:
        if os.name == "posix":
            ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT_S)
            if not ready:
                raise TimeoutError("decoder worker did not answer")

    def readinto(self, view: memoryview) -> None:
        while view:
            self._wait_readable()
            n = self.proc.stdout.readinto(view)
            if not n:
                raise EOFError("decoder worker exited")
            view = view[n:]

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(memoryview(buf))
        return bytes(buf)

    def close(self, kill: bool = False) -> None:
        with contextlib.suppress(Exception):
            if kill:
                self.proc.kill()
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=2)
        with contextlib.suppress(Exception):
            self.proc.stdout.close()


class DecoderPool:
    """Decoder subprocesses reused across calls; ``lock`` serialises their use by concurrent calls."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.workers: list[Worker] = []

    def start(self, n: int) -> list[Worker]:
        """At least ``n`` live workers (caller holds ``lock``); returns the first ``n``."""
        for w in self.workers:
            if not w.alive():
                w.close(kill=True)
        self.workers = [w for w in self.workers if w.alive()]
        while len(self.workers) < n:
            self.workers.append(Worker())
        return self.workers[:n]

    def prestart(self, n: int) -> None:
        """Start workers early (they import their decoders while headers are read), if not busy."""
        if self.lock.acquire(blocking=False):
            try:
                self.start(n)
            except OSError:
                pass
            finally:
                self.lock.release()

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []


_POOL: DecoderPool | None = None
_POOL_GUARD = threading.Lock()


def get_pool() -> DecoderPool:
    global _POOL
    with _POOL_GUARD:
        if _POOL is None or _POOL.pid != os.getpid():
            _POOL = DecoderPool()  # never touch a parent's workers after a fork
        return _POOL


def _forget_pool_after_fork() -> None:
    """In a forked child: drop the parent's pool and our copies of its pipes (the workers stay)."""
    global _POOL, _POOL_GUARD
    for w in _POOL.workers if _POOL is not None else ():
        with contextlib.suppress(Exception):
            w.proc.stdin.close()
            w.proc.stdout.close()
    _POOL, _POOL_GUARD = None, threading.Lock()


def shutdown() -> None:
    """Stop the decoder subprocesses (they are restarted on demand; also runs at exit)."""
    global _POOL
    with _POOL_GUARD:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        with pool.lock:
            pool.close()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _feed(worker: Worker, chunks: queue.SimpleQueue, out: np.ndarray, outcome: Outcome) -> None:
    """Feed chunks of jobs to one worker and copy its answers into ``out``, until none are left."""
    while True:
        try:
            chunk = chunks.get_nowait()
        except queue.Empty:
            return
        pending = {job.slot: job for job in chunk}
        crash = os.environ.get(CRASH_TEST_ENV, "")
        try:
            worker.send({"jobs": [tuple(j) for j in chunk], "dtype": out.dtype.str, "crash": crash})
            for _ in chunk:
                slot, status, n = ANSWER.unpack(worker.read(ANSWER.size))
                job = pending.pop(slot)
                if status == OK:
                    if n != out[slot].nbytes:
                        raise ValueError(f"answer of {n} bytes for a {out[slot].nbytes}-byte slice")
                    worker.readinto(memoryview(out[slot]).cast("B"))
                elif status == OVERFLOW:
                    outcome.overflow.append(job)
                elif job.method == "dicomsdl":
                    worker.read(n)
                    outcome.retry.append(job)
                else:
                    outcome.errors[slot] = worker.read(n).decode(errors="replace")
        except (EOFError, OSError, TimeoutError, KeyError, ValueError):
            worker.close(kill=True)
            outcome.crashed.extend(pending.values())
            return


def decode_remote(jobs: Sequence[SliceJob], out: np.ndarray, workers: int, outcome: Outcome) -> None:
    """Decode in worker subprocesses; whatever a dead worker left undone ends up in ``outcome.crashed``."""
    if not jobs:
        return
    size = max(1, min(8, len(jobs) // (4 * workers)))
    chunks: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(0, len(jobs), size):
        chunks.put(list(jobs[i : i + size]))
    pool = get_pool()
    with pool.lock:
        try:
            live = pool.start(workers)
        except OSError:
            live = []
        threads = [threading.Thread(target=_feed, args=(w, chunks, out, outcome), daemon=True) for w in live]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # e.g. KeyboardInterrupt: no thread may keep using a worker after the lock
            for w in live:
                w.close(kill=True)
            raise
    while not chunks.empty():
        outcome.crashed.extend(chunks.get_nowait())


def decode_again_with_pydicom(jobs: Sequence[SliceJob], out: np.ndarray, outcome: Outcome) -> None:
    """Decode again with pydicom in this process what a worker could not."""
    for job in jobs:
        decode_local([job._replace(method="pydicom", dtype=job.dtype.replace("<", "="))], out, 1, outcome)
