"""Read one DICOM CT series (a study folder) into a Hounsfield-unit :class:`~cervspine.io.study.Study`.

:func:`load_study` reads every header (:mod:`~cervspine.io.headers`), checks the series
(:mod:`~cervspine.io.checks`), orders the slices by geometry, never by file name
(:mod:`~cervspine.io.geometry`), decodes the pixels straight into one preallocated output array and
records the metadata (:mod:`~cervspine.io.metadata`). Decoding:

* native little-endian slices are read from the file bytes with numpy, in this process;
* compressed slices are decoded in a small pool of reusable decoder subprocesses
  (:mod:`~cervspine.io.decode_pool`) with dicomsdl (JPEG Lossless, JPEG-LS, JPEG 2000) or pydicom (RLE
  and everything else). A worker that crashes takes only its current files with it: they are decoded
  again with pydicom in this process.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cervspine.io import decode_pool as pool
from cervspine.io.checks import check_losses, validate
from cervspine.io.decode_pool import shutdown as shutdown_decoders
from cervspine.io.decode_worker import SliceJob
from cervspine.io.errors import StudyReadError, file_names
from cervspine.io.geometry import Gaps, find_gaps, order_slices, superior_normal
from cervspine.io.headers import SliceHeader, list_files, read_headers
from cervspine.io.metadata import instance_numbers, pixel_spacing, series_metadata
from cervspine.io.study import Study
from cervspine.io.values import text

__all__ = ["load_study", "shutdown_decoders", "superior_normal", "DECODERS"]

DECODERS = ("auto", "pydicom", "dicomsdl")
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
# dicomsdl matches pydicom on these (after the same unused-bit correction) and is faster (see report)
DICOMSDL_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, process 14
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    }
)


def load_study(
    folder: str | os.PathLike,
    *,
    workers: int = 2,
    decoder: str = "auto",
    max_missing_slices: int = 2,
    uid: str | None = None,
) -> Study:
    """Read one CT series folder into a :class:`Study` (HU volume, index 0 the most superior slice).

    Slices are ordered by ImagePositionPatient projected on the slice normal (row × column direction,
    pointing superior), never by file name. The folder must hold exactly one CT series with one
    orientation (oblique is fine); anything else raises :class:`StudyReadError` naming the files.

    Unreadable-slice policy: files named like DICOM (``.dcm`` …) or carrying the ``DICM`` preamble
    that cannot be read or decoded (zero-byte, truncated, corrupt) are dropped, and slice positions
    missing from the series (a step > 1.5 × the median spacing) are counted from the gap size. When
    dropped + missing ≤ ``max_missing_slices`` the study loads with a warning naming the files (listed
    in ``metadata["dropped_files"]``); otherwise :class:`StudyReadError` lists them. Files that are
    clearly not DICOM (no preamble, not parseable, e.g. ``notes.txt``, ``.DS_Store``) and DICOMDIRs are
    ignored with a warning (``metadata["ignored_files"]``).

    Args:
        folder: the series folder (any file names).
        workers: decoder processes for compressed slices (native slices use as many threads); 0
            decodes everything in this process with pydicom/numpy.
        decoder: "auto" (numpy for native little endian, dicomsdl for JPEG Lossless / JPEG-LS /
            JPEG 2000, pydicom otherwise), "pydicom" (pydicom's pixel_array for every slice) or
            "dicomsdl" (dicomsdl wherever it can, never for RLE). dicomsdl only ever runs in worker
            processes; a crashing or failing worker's slices are decoded again with pydicom here.
        max_missing_slices: how many dropped or missing slices are tolerated (with a warning).
        uid: the study UID to record; default StudyInstanceUID, else the folder name.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    folder = Path(folder)
    workers = max(0, int(workers))

    def prestart(first: SliceHeader) -> None:
        if _job(0, first, decoder, workers, _dicomsdl_available())[1]:
            pool.get_pool().prestart(max(1, workers))

    scan = read_headers(list_files(folder), on_first=prestart)
    if scan.ignored:
        warnings.warn(f"{folder}: ignoring non-DICOM file(s) {file_names(scan.ignored)}", UserWarning, 2)
    if not scan.headers:
        detail = f"; unreadable: {file_names(scan.unreadable)}" if scan.unreadable else ""
        raise StudyReadError(f"{folder} contains no readable DICOM slice{detail}")
    validate(folder, scan.headers)
    ordered, z, _ = order_slices(folder, scan.headers)
    gaps = find_gaps(ordered, z)
    dropped = dict(scan.unreadable)
    check_losses(folder, max(gaps.missing, len(dropped)), max_missing_slices, dropped, gaps)

    volume, errors = _decode_volume(ordered, workers, decoder)
    if errors:
        dropped.update({ordered[i].path.name: errors[i] for i in sorted(errors)})
        lost = len(errors) + max(gaps.missing, len(scan.unreadable))
        check_losses(folder, lost, max_missing_slices, dropped, gaps)
        keep = np.array([i not in errors for i in range(len(ordered))])
        volume, ordered, z = _compact(folder, volume, keep), [h for h, k in zip(ordered, keep) if k], z[keep]
    return _study(folder, ordered, volume, z, gaps, uid, list(dropped), scan.ignored)


def _compact(folder: Path, volume: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Drop slices in place (no second volume in memory); returns a view on the kept ones."""
    j = 0
    for i in np.flatnonzero(keep):
        if i != j:
            volume[j] = volume[i]
        j += 1
    if j == 0:
        raise StudyReadError(f"{folder}: no slice could be decoded")
    return volume[:j]


def _study(
    folder: Path,
    ordered: list[SliceHeader],
    volume: np.ndarray,
    z: np.ndarray,
    gaps: Gaps,
    uid: str | None,
    dropped: list[str],
    ignored: list[str],
) -> Study:
    """The Study of the ordered, decoded slices, with the first slice's metadata."""
    first = ordered[0]
    numbers = instance_numbers(ordered)
    steps = np.sign(np.diff(numbers))
    stored_reversed = bool(steps.sum() < 0)
    ds = first.dataset()
    try:
        dy, dx = pixel_spacing(folder, ds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metadata = series_metadata(ds, first.transfer_syntax)
            study_uid = uid or text(ds.get("StudyInstanceUID")) or folder.name
    except Exception as exc:  # a value pydicom cannot convert (corrupt VR or length)
        raise StudyReadError(
            f"{first.path}: cannot read the DICOM metadata ({type(exc).__name__}: {exc})"
        ) from exc
    metadata.update(
        num_slices=len(ordered),
        stored_reversed=stored_reversed,
        dropped_files=list(dropped),
        ignored_files=list(ignored),
        missing_slices=gaps.missing,
    )
    return Study(
        uid=study_uid,
        folder=folder,
        volume=volume,
        instance_numbers=numbers,
        z_positions=z.astype(np.float64),
        spacing=(gaps.dz, float(dy), float(dx)),
        positions=np.stack([h.position for h in ordered]),
        orientation=first.orientation.copy(),
        stored_reversed=stored_reversed,
        files=[h.path for h in ordered],
        metadata=metadata,
    )


# ------------------------------------------------------------------------------------------ decoding


def _stored_dtype(h: SliceHeader, native_le: bool) -> str:
    kind = "i" if h.signed else "u"
    return ("<" if native_le else "=") + kind + str(h.bits_allocated // 8)


@functools.lru_cache(maxsize=1)
def _dicomsdl_available() -> bool:
    return importlib.util.find_spec("dicomsdl") is not None


def _job(slot: int, h: SliceHeader, decoder: str, workers: int, have_sdl: bool) -> tuple[SliceJob, bool]:
    """The decode job for one slice and whether it runs in a worker process."""
    raw = h.pixel_offset >= 0
    sdl_ok = have_sdl and h.transfer_syntax != RLE_LOSSLESS and h.bits_allocated in (8, 16)
    if decoder == "dicomsdl" and sdl_ok:
        method, remote = "dicomsdl", True
    elif decoder == "auto" and raw:
        method, remote = "raw", False
    elif decoder == "auto" and sdl_ok and workers > 0 and h.transfer_syntax in DICOMSDL_SYNTAXES:
        method, remote = "dicomsdl", True
    else:
        method, remote = "pydicom", workers > 0
    job = SliceJob(
        slot=slot,
        path=str(h.path),
        method=method,
        rows=h.rows,
        cols=h.cols,
        dtype=_stored_dtype(h, native_le=method == "raw"),
        bits_stored=h.bits_stored,
        slope=h.slope,
        intercept=h.intercept,
        offset=h.pixel_offset,
    )
    return job, remote


def _output_dtype(headers: Sequence[SliceHeader]) -> np.dtype:
    integral = all(float(h.slope).is_integer() and float(h.intercept).is_integer() for h in headers)
    return np.dtype(np.int16 if integral else np.float32)


def _decode_volume(
    ordered: Sequence[SliceHeader], workers: int, decoder: str
) -> tuple[np.ndarray, dict[int, str]]:
    """The HU volume in ``ordered`` order (int16 if possible, else float32) and the failed slots."""
    have_sdl = _dicomsdl_available()
    dtype = _output_dtype(ordered)
    out = np.empty((len(ordered), ordered[0].rows, ordered[0].cols), dtype=dtype)
    planned = [_job(i, h, decoder, workers, have_sdl) for i, h in enumerate(ordered)]
    outcome = pool.Outcome()
    local = [job for job, remote in planned if not remote]
    remote = [job for job, remote in planned if remote]
    pool.decode_local(local, out, max(1, workers), outcome)
    pool.decode_remote(remote, out, max(1, workers), outcome)
    pool.decode_again_with_pydicom(outcome.crashed + outcome.retry, out, outcome)
    if outcome.overflow:  # the HU range does not fit int16 after all: redo those slices in float32
        out = out.astype(np.float32)
        redo, outcome.overflow = outcome.overflow, []
        pool.decode_again_with_pydicom([j for j in redo if j.method != "raw"], out, outcome)
        pool.decode_local([j for j in redo if j.method == "raw"], out, 1, outcome)
    return out, outcome.errors
