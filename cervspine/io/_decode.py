"""Slice decoding for :func:`cervspine.io.dicom.load_study`: decoders, and a pool of decoder subprocesses.

Parent side: :func:`decode_local` decodes in this process (numpy for native data, pydicom);
:func:`decode_remote` feeds jobs to reusable worker subprocesses and reads each decoded slice straight
into the output array; whatever a dying worker leaves undone is reported so that the caller can decode
it again with pydicom here. Worker side: run as a script (``python -c … _decode.py``), this module
reads pickled requests from stdin and streams each slice (in Hounsfield units, in the output dtype) back
over stdout, so that a crash of a native decoder (dicomsdl) kills only the worker, never the caller.
The module imports only the standard library and numpy (dicomsdl and pydicom on first use) and must not
import ``cervspine``: the worker is started from the file path, without the package.

Wire format: a request is ``<Q length><pickle>``; each answer is ``<q slot><i status><Q length><payload>``
where the payload is the slice bytes (status OK), empty (OVERFLOW) or a UTF-8 message (ERROR).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

OK, OVERFLOW, ERROR = 0, 1, 2
CRASH_TEST_ENV = "CERVSPINE_DECODER_CRASH_TEST"  # testing hook: a file name (or "*") kills the worker
ANSWER_TIMEOUT_S = 120.0
REQUEST = struct.Struct("<Q")
ANSWER = struct.Struct("<qiQ")
_INT16 = np.iinfo(np.int16)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class SliceJob(NamedTuple):
    """What a decoder needs to turn one file into one HU slice (sent to workers as a plain tuple)."""

    slot: int  # index in the output volume
    path: str
    method: str  # "raw" (numpy, native little endian), "pydicom" or "dicomsdl"
    rows: int
    cols: int
    dtype: str  # numpy dtype of the stored values, e.g. "<i2"
    bits_stored: int
    slope: float
    intercept: float
    offset: int = -1  # PixelData value offset in the file (method "raw")


class DecodeError(RuntimeError):
    """A slice could not be decoded."""


def recoverable(exc: BaseException) -> bool:
    """A decoder failure to record (and fall back from) rather than propagate: any Exception, and the
    ``PanicException`` (a BaseException) that Rust-based decoders (pylibjpeg-rle, via pyo3) raise on
    corrupt data."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _unused_bits_corrected(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Mask (unsigned) or sign-extend (signed) the unused high bits, as pydicom's pixel_array does."""
    shift = 8 * arr.dtype.itemsize - bits_stored
    if 0 < shift < 8 * arr.dtype.itemsize:
        if not arr.flags.writeable:
            arr = arr.copy()
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr


def _decode_raw(job: SliceJob) -> np.ndarray:
    dtype = np.dtype(job.dtype)
    count = job.rows * job.cols
    arr = np.fromfile(job.path, dtype=dtype, count=count, offset=job.offset)
    if arr.size != count:
        raise DecodeError(f"pixel data truncated: {arr.size} of {count} pixels")
    return arr.reshape(job.rows, job.cols)


def _decode_pydicom(job: SliceJob) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(job.path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare dataset without file meta: as it was read
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else pydicom.uid.ExplicitVRLittleEndian
            if little
            else pydicom.uid.ExplicitVRBigEndian
        )
    arr = ds.pixel_array
    if arr.shape != (job.rows, job.cols):
        raise DecodeError(f"decoded shape {arr.shape}, expected {(job.rows, job.cols)}")
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _decode_dicomsdl(job: SliceJob) -> np.ndarray:
    import dicomsdl

    dset = dicomsdl.open(job.path)
    info = dset.getPixelDataInfo()
    got = (info["Rows"], info["Cols"], info["SamplesPerPixel"], info["NumberOfFrames"], info["dtype"])
    want = (job.rows, job.cols, 1, 1, np.dtype(job.dtype).newbyteorder("=").char)
    if got[:4] != want[:4] or np.dtype(got[4]) != np.dtype(want[4]):
        raise DecodeError(f"dicomsdl sees {got}, expected {want}")
    arr = np.empty((job.rows, job.cols), dtype=want[4])
    dset.copyFrameData(0, arr)
    return arr


_DECODERS = {"raw": _decode_raw, "pydicom": _decode_pydicom, "dicomsdl": _decode_dicomsdl}


def decode_stored(job: SliceJob) -> np.ndarray:
    """The slice's stored values (native byte order, unused bits corrected) as a (rows, cols) array."""
    arr = _DECODERS[job.method](job)
    if arr.dtype.kind not in "iu":
        raise DecodeError(f"non-integer pixel data ({arr.dtype})")
    return _unused_bits_corrected(arr, job.bits_stored)


def store_hu(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> bool:
    """Write ``stored * slope + intercept`` into ``out``; False (``out`` untouched) if int16 overflows.

    int16 output needs an integral slope and intercept (the caller checks); the sum is formed in int32.
    float32 output is rounded once from the float64 result, so it equals pydicom's float64 formula cast
    to float32; values beyond float32's range raise :class:`DecodeError` (a corrupt rescale).
    """
    if out.dtype == np.int16:
        hu = stored.astype(np.int32)
        if slope != 1:
            hu *= int(slope)
        if intercept:
            hu += int(intercept)
        if hu.size and (hu.min() < _INT16.min or hu.max() > _INT16.max):
            return False
        out[...] = hu
        return True
    hu64 = stored.astype(np.float64)
    if slope != 1:
        hu64 *= slope
    if intercept:
        hu64 += intercept
    if hu64.size and not np.abs(hu64).max() <= _FLOAT32_MAX:  # also catches inf / nan
        raise DecodeError(f"RescaleSlope {slope} / RescaleIntercept {intercept} overflow float32")
    out[...] = hu64
    return True


def decode_into(job: SliceJob, out: np.ndarray) -> bool:
    """Decode one slice into ``out`` (HU); False on int16 overflow. Raises on decode errors."""
    return store_hu(decode_stored(job), job.slope, job.intercept, out)


# ------------------------------------------------------------------------------------ parent side


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
    """One decoder subprocess speaking the ``_decode`` pipe protocol."""

    BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.BOOT, __file__],
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


# ---------------------------------------------------------------------------------------------- worker


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _crash_now() -> None:
    """Die like a native decoder crash would (testing hook, see :data:`CRASH_TEST_ENV`)."""
    if hasattr(signal, "SIGSEGV"):
        os.kill(os.getpid(), signal.SIGSEGV)
    os._exit(139)


def _answer(out_stream: BinaryIO, slot: int, status: int, payload: bytes | memoryview) -> None:
    out_stream.write(ANSWER.pack(slot, status, len(payload)))
    if len(payload):
        out_stream.write(payload)
    out_stream.flush()


def serve(in_stream: BinaryIO, out_stream: BinaryIO) -> None:
    """Answer requests until stdin closes: ``{"jobs": [tuple], "dtype": str, "crash": str}``."""
    buffers: dict[tuple, np.ndarray] = {}
    while True:
        try:
            (length,) = REQUEST.unpack(_read_exact(in_stream, REQUEST.size))
            request = pickle.loads(_read_exact(in_stream, length))
        except EOFError:
            return
        crash = request.get("crash") or ""
        for fields in request["jobs"]:
            job = SliceJob(*fields)
            if crash and crash in ("*", Path(job.path).name):
                _crash_now()
            key = (job.rows, job.cols, request["dtype"])
            if key not in buffers:
                buffers[key] = np.empty(key[:2], dtype=key[2])
            out = buffers[key]
            try:
                ok = decode_into(job, out)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which falls back
                if not recoverable(exc):
                    raise
                _answer(out_stream, job.slot, ERROR, f"{type(exc).__name__}: {exc}".encode())
                continue
            _answer(out_stream, job.slot, OK if ok else OVERFLOW, memoryview(out).cast("B") if ok else b"")


def main() -> None:
    # Keep fd 1 for the protocol only: anything a library prints goes to stderr instead.
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with contextlib.suppress(ImportError):  # import the native decoder now, while the parent reads headers
        import dicomsdl  # noqa: F401
    serve(sys.stdin.buffer, proto_out)


if __name__ == "__main__":
    main()
