"""The decoder worker: a subprocess that decodes slices for :mod:`cervspine.io.decode_pool`, and the
slice decoders it shares with the parent (which uses them in-process for native data and fallbacks).

Run by path (``python -c "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')" <this
file>``), it reads pickled requests from stdin and streams each slice (in Hounsfield units, in the output
dtype) back over stdout, so that a crash of a native decoder (dicomsdl) kills only the worker, never the
caller. It imports only the standard library and numpy (dicomsdl and pydicom on first use) and must not
import ``cervspine``, nor any sibling module: started from the file path, it has no package.

Wire format: a request is ``<Q length><pickle>`` of ``{"jobs": [tuple], "dtype": str, "crash": str}``;
each answer is ``<q slot><i status><Q length><payload>`` where the payload is the slice bytes (status
OK), empty (OVERFLOW) or a UTF-8 message (ERROR).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import sys
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

OK, OVERFLOW, ERROR = 0, 1, 2
REQUEST = struct.Struct("<Q")
ANSWER = struct.Struct("<qiQ")
_INT16 = np.iinfo(np.int16)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# -------------------------------------------------------------------------------------------- decoders


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
    """Die like a native decoder crash would (testing hook: a request's "crash" field, see
    :data:`cervspine.io.decode_pool.CRASH_TEST_ENV`)."""
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
    """Serve requests on stdin/stdout (the subprocess's entry point)."""
    # Keep fd 1 for the protocol only: anything a library prints goes to stderr instead.
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with contextlib.suppress(ImportError):  # import the native decoder now, while the parent reads headers
        import dicomsdl  # noqa: F401
    serve(sys.stdin.buffer, proto_out)


if __name__ == "__main__":
    main()
