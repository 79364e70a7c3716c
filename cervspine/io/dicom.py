"""Read one DICOM CT series (a study folder) into a Hounsfield-unit :class:`~cervspine.io.study.Study`.

Headers are read with a small strict reader (``_fast_header``), falling back to pydicom for anything it
does not handle; slices are ordered by geometry (never by file name). Pixel data is decoded straight into
one preallocated output array (``_decode``):

* native little-endian slices are read from the file bytes with numpy, in this process;
* compressed slices are decoded in a small pool of reusable decoder subprocesses with dicomsdl (JPEG
  Lossless, JPEG-LS, JPEG 2000) or pydicom (RLE and everything else). A worker that crashes takes only
  its current files with it: they are decoded again with pydicom in this process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from cervspine.io import _decode as dw
from cervspine.io import _fast_header as fast_header
from cervspine.io._decode import CRASH_TEST_ENV
from cervspine.io._decode import shutdown as shutdown_decoders
from cervspine.io.errors import StudyReadError
from cervspine.io.study import Study

__all__ = ["load_study", "shutdown_decoders", "superior_normal", "CRASH_TEST_ENV", "DECODERS"]

DECODERS = ("auto", "pydicom", "dicomsdl")
NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
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
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_DATA = 0x7FE00010
ORIENTATION_TOL = 1e-3  # max abs difference between ImageOrientationPatient values of one series
DUPLICATE_TOL_MM = 1e-2
GAP_FACTOR = 1.5
_DEFER_BYTES = 256  # pydicom path: leave PixelData (and other big values) on disk


# ------------------------------------------------------------------------------------------ headers


@dataclass
class _Header:
    """The fields of one slice file that ordering, validation and decoding need."""

    path: Path
    modality: str | None
    series_uid: str | None
    transfer_syntax: str
    orientation: np.ndarray | None  # (6,)
    position: np.ndarray | None  # (3,)
    instance_number: int | None
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    samples: int
    frames: int
    slope: float
    intercept: float
    pixel_offset: int  # native PixelData value offset in the file, -1 when not directly readable
    ds: Dataset | None = None  # pydicom's header, when read with pydicom

    def dataset(self) -> Dataset:
        """The full header (pydicom), read on demand for the metadata of the first slice."""
        if self.ds is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    self.ds = pydicom.dcmread(self.path, stop_before_pixels=True, force=True)
                except Exception as exc:  # the fast reader took it, pydicom does not: a corrupt header
                    raise StudyReadError(
                        f"{self.path}: cannot read the DICOM header ({type(exc).__name__}: {exc})"
                    ) from exc
        return self.ds


@dataclass
class _Scan:
    """Result of reading every file's header."""

    headers: list[_Header] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # file name -> reason
    ignored: list[str] = field(default_factory=list)  # clearly not DICOM slices


def _list_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise StudyReadError(f"study folder {folder} does not exist")
    if not folder.is_dir():
        raise StudyReadError(f"study folder {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise StudyReadError(f"study folder {folder} contains no files")
    return files


def _float(value: Any, default: float | None = None) -> float | None:
    """A DICOM numeric value (first of a multi-value) as float, ``default`` when absent or invalid."""
    if isinstance(value, str) and "\\" in value:
        value = value.split("\\")
    if value is None or value == "":
        return default
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
        return _float(value, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(value: Any, default: int | None = None) -> int | None:
    """An integral DICOM value (IS/US/SL/UL: within 32 bits), ``default`` when absent or invalid."""
    number = _float(value)
    if number is None or not number.is_integer() or not -(2**31) <= number < 2**32:
        return default
    return int(number)


def _positive(*values: Any) -> float | None:
    """The first value that is a finite number > 0, else None."""
    for value in values:
        number = _float(value)
        if number is not None and np.isfinite(number) and number > 0:
            return number
    return None


def _vector(value: Any, n: int) -> np.ndarray | None:
    if isinstance(value, str):
        value = value.split("\\")
    try:
        vec = np.array([float(v) for v in value or ()], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return vec if vec.shape == (n,) and np.all(np.isfinite(vec)) else None


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is False:
        return "1.2.840.10008.1.2.2"
    return "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"


def _native_offset(ts: str, rows: int, cols: int, bits: int, offset: int | None, length: int) -> int:
    """Where numpy can read the pixels straight from the file, else -1."""
    if ts not in NATIVE_LE or bits not in (8, 16, 32) or offset is None or length < rows * cols * bits // 8:
        return -1
    return offset


def _make_header(path: Path, get: Callable[[str], Any], ts: str, offset: int | None, length: int) -> _Header:
    """A _Header from a field getter (pydicom's ``ds.get`` or the fast reader's ``dict.get``)."""
    rows, cols = _int(get("Rows"), 0), _int(get("Columns"), 0)
    bits = _int(get("BitsAllocated"), 16) or 16
    modality, series = _text(get("Modality")), _text(get("SeriesInstanceUID"))
    return _Header(
        path=path,
        modality=modality.strip().upper() if modality else None,
        series_uid=series,
        transfer_syntax=ts,
        orientation=_vector(get("ImageOrientationPatient"), 6),
        position=_vector(get("ImagePositionPatient"), 3),
        instance_number=_int(get("InstanceNumber")),
        rows=rows,
        cols=cols,
        bits_allocated=bits,
        bits_stored=_int(get("BitsStored"), bits) or bits,
        signed=_int(get("PixelRepresentation"), 0) == 1,
        samples=_int(get("SamplesPerPixel"), 1) or 1,
        frames=_int(get("NumberOfFrames"), 1) or 1,
        slope=float(_float(get("RescaleSlope"), 1.0)),
        intercept=float(_float(get("RescaleIntercept"), 0.0)),
        pixel_offset=_native_offset(ts, rows, cols, bits, offset, length),
    )


def _header_pydicom(path: Path, ds: Dataset) -> _Header:
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    deferred = getattr(raw, "value", b"") is None and getattr(raw, "value_tell", None) is not None
    defined = deferred and not getattr(raw, "is_undefined_length", False)
    offset, length = (int(raw.value_tell), int(raw.length)) if defined else (None, 0)
    header = _make_header(path, ds.get, _transfer_syntax(ds), offset, length)
    header.ds = ds
    return header


def _header_fast(path: Path, fh: BinaryIO) -> _Header:
    fields = {k: v for k, v in fast_header.read_header(fh).items() if v != ""}
    ts = fields["TransferSyntaxUID"]
    length = fields["PixelDataLength"]
    return _make_header(path, fields.get, ts, fields["PixelDataOffset"], length)


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(sop or ds.get("SOPClassUID", "")) == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def _read_pydicom(path: Path) -> tuple[_Header | None, str]:
    """The header read by pydicom, or None and why not ("DICOMDIR" for a directory file)."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
        if PIXEL_DATA not in ds:
            return None, "DICOMDIR" if _is_dicomdir(ds) else "no pixel data (truncated?)"
        return _header_pydicom(path, ds), ""
    except Exception as exc:  # noqa: BLE001 - any parse failure makes the file unreadable
        return None, f"{type(exc).__name__}: {exc}"


def _read_one(path: Path, scan: _Scan) -> _Header | None:
    """Classify one file: a slice header, an unreadable slice, or an ignored non-DICOM file."""
    with open(path, "rb") as fh:
        head = fh.read(132)
        preamble = head[128:132] == b"DICM"
        if preamble:
            fh.seek(0)
            with contextlib.suppress(Exception):  # anything unusual: pydicom decides below
                return _header_fast(path, fh)
    header, reason = _read_pydicom(path) if head else (None, "empty file")
    if header is None:
        named_dicom = path.suffix.lower() in DICOM_SUFFIXES and not path.name.startswith(".")
        if (preamble or named_dicom) and reason != "DICOMDIR":
            scan.unreadable[path.name] = reason
        else:
            scan.ignored.append(path.name)
    return header


def _scan(files: Iterable[Path], on_first: Callable[[_Header], None] | None = None) -> _Scan:
    scan = _Scan()
    with warnings.catch_warnings():  # pydicom's complaints about odd values; the checks below decide
        warnings.simplefilter("ignore")
        for path in files:
            header = _read_one(path, scan)
            if header is not None:
                if on_first is not None and not scan.headers:
                    on_first(header)
                scan.headers.append(header)
    return scan


# ---------------------------------------------------------------------------------------- validation


def _names(paths: Iterable[Path | str], limit: int = 8) -> str:
    names = [Path(p).name for p in paths]
    more = f" … (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _validate(folder: Path, headers: list[_Header]) -> None:
    """Modality, one series, one orientation, one slice geometry; raise naming the offending files."""
    not_ct = [h for h in headers if (h.modality or "").upper() != "CT"]
    if not_ct:
        h = not_ct[0]
        raise StudyReadError(
            f"{folder}: {h.path.name} has Modality {h.modality!r}, expected 'CT'"
            + (f" ({len(not_ct)} such files: {_names(x.path for x in not_ct)})" if len(not_ct) > 1 else "")
        )
    series = Counter(h.series_uid for h in headers)
    if len(series) > 1:
        listing = "; ".join(f"{uid}: {n} files" for uid, n in series.most_common())
        raise StudyReadError(f"{folder} holds {len(series)} series, expected one: {listing}")
    for name, attr in (("ImagePositionPatient", "position"), ("ImageOrientationPatient", "orientation")):
        lacking = [h.path for h in headers if getattr(h, attr) is None]
        if lacking:
            raise StudyReadError(f"{folder}: no valid {name} in {_names(lacking)}")
    ref = headers[0]
    odd = [h for h in headers if np.max(np.abs(h.orientation - ref.orientation)) > ORIENTATION_TOL]
    if odd:
        raise StudyReadError(
            f"{folder}: more than one ImageOrientationPatient in the series: {ref.path.name} has "
            f"{ref.orientation.tolist()}, {odd[0].path.name} has {odd[0].orientation.tolist()} "
            f"({len(odd)} files differ: {_names(h.path for h in odd)})"
        )
    _validate_pixels(folder, headers)


def _validate_pixels(folder: Path, headers: list[_Header]) -> None:
    shapes = Counter((h.rows, h.cols) for h in headers)
    if len(shapes) > 1:
        (main, _), *_ = shapes.most_common()
        odd = [h.path for h in headers if (h.rows, h.cols) != main]
        raise StudyReadError(f"{folder}: slice sizes differ {dict(shapes)}; not {main}: {_names(odd)}")
    bad = [h for h in headers if h.samples != 1 or h.frames != 1 or h.bits_allocated not in (8, 16, 32)]
    if bad:
        h = bad[0]
        raise StudyReadError(
            f"{folder}: {h.path.name} is not a single-frame grayscale slice (SamplesPerPixel {h.samples}, "
            f"NumberOfFrames {h.frames}, BitsAllocated {h.bits_allocated})"
        )
    if headers[0].rows <= 0 or headers[0].cols <= 0:
        raise StudyReadError(f"{folder}: {headers[0].path.name} has no Rows/Columns")
    odd = [h.path for h in headers if not (np.isfinite(h.slope) and np.isfinite(h.intercept))]
    if odd:
        raise StudyReadError(f"{folder}: non-finite RescaleSlope/RescaleIntercept in {_names(odd)}")


# ------------------------------------------------------------------------------------------ geometry


def superior_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal row × column, flipped so that it points superior (+z LPS) when it has a z part."""
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise StudyReadError(f"degenerate ImageOrientationPatient {orientation.tolist()}")
    normal /= norm
    return -normal if normal[2] < 0 else normal


def _order(folder: Path, headers: list[_Header]) -> tuple[list[_Header], np.ndarray, np.ndarray]:
    """Headers sorted superior → inferior, their projections on the normal, and the normal."""
    normal = superior_normal(headers[0].orientation)
    proj = np.array([h.position @ normal for h in headers])
    if not np.all(np.isfinite(proj)):
        odd = [h.path for h, p in zip(headers, proj) if not np.isfinite(p)]
        raise StudyReadError(f"{folder}: ImagePositionPatient out of range in {_names(odd)}")
    order = np.argsort(-proj, kind="stable")
    ordered = [headers[i] for i in order]
    z = proj[order]
    dup = np.flatnonzero(np.abs(np.diff(z)) < DUPLICATE_TOL_MM)
    if dup.size:
        a, b = ordered[dup[0]], ordered[dup[0] + 1]
        raise StudyReadError(
            f"{folder}: {a.path.name} and {b.path.name} have the same slice position "
            f"({z[dup[0]]:.3f} mm along the normal); {dup.size} duplicate position(s) in all"
        )
    return ordered, z, normal


@dataclass
class _Gaps:
    dz: float
    missing: int
    descriptions: list[str]


def _gaps(ordered: list[_Header], z: np.ndarray) -> _Gaps:
    """Median slice spacing and the slices missing where a step exceeds GAP_FACTOR × the median."""
    if len(z) < 2:
        ds = ordered[0].dataset()
        try:
            dz = _positive(ds.get("SpacingBetweenSlices"), ds.get("SliceThickness")) or 1.0
        except Exception as exc:  # a value pydicom cannot convert (corrupt VR or length)
            raise StudyReadError(f"{ordered[0].path}: cannot read the slice spacing ({exc})") from exc
        return _Gaps(float(dz), 0, [])
    steps = -np.diff(z)
    dz = float(np.median(steps))
    missing, descriptions = 0, []
    for i in np.flatnonzero(steps > GAP_FACTOR * dz):
        n = max(1, round(steps[i] / dz) - 1)
        missing += n
        descriptions.append(
            f"{steps[i]:.2f} mm gap (≈{n} missing) between {ordered[i].path.name} and "
            f"{ordered[i + 1].path.name}"
        )
    return _Gaps(dz, missing, descriptions)


def _why(reasons: Mapping[str, str], limit: int = 3) -> str:
    """The most common reasons files were dropped, with counts and an example file each."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason or "unknown reason", []).append(name)
    common = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    return "; ".join(f"{len(names)}× {reason} (e.g. {names[0]})" for reason, names in common[:limit])


def _check_losses(folder: Path, lost: int, limit: int, dropped: Mapping[str, str], gaps: _Gaps) -> None:
    """Warn about (≤ limit) or refuse (> limit) a study with dropped or missing slices (``dropped``:
    file name → why it could not be read or decoded)."""
    if lost == 0:
        return
    parts = []
    if dropped:
        parts.append(f"unreadable slice file(s): {_names(dropped, limit=20)} — {_why(dropped)}")
    if gaps.descriptions:
        parts.append("; ".join(gaps.descriptions))
    detail = "; ".join(parts)
    if lost > limit:
        raise StudyReadError(
            f"{folder}: {lost} slice(s) missing or unreadable, more than max_missing_slices={limit}: {detail}"
        )
    warnings.warn(f"{folder}: {lost} slice(s) dropped or missing ({detail})", UserWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------ decoding


def _stored_dtype(h: _Header, native_le: bool) -> str:
    kind = "i" if h.signed else "u"
    return ("<" if native_le else "=") + kind + str(h.bits_allocated // 8)


@functools.lru_cache(maxsize=1)
def _dicomsdl_available() -> bool:
    return importlib.util.find_spec("dicomsdl") is not None


def _job(slot: int, h: _Header, decoder: str, workers: int, have_sdl: bool) -> tuple[dw.SliceJob, bool]:
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
    job = dw.SliceJob(
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


def _output_dtype(headers: Sequence[_Header]) -> np.dtype:
    integral = all(float(h.slope).is_integer() and float(h.intercept).is_integer() for h in headers)
    return np.dtype(np.int16 if integral else np.float32)


def _decode_volume(
    ordered: Sequence[_Header], workers: int, decoder: str
) -> tuple[np.ndarray, dict[int, str]]:
    """The HU volume in ``ordered`` order (int16 if possible, else float32) and the failed slots."""
    have_sdl = _dicomsdl_available()
    dtype = _output_dtype(ordered)
    out = np.empty((len(ordered), ordered[0].rows, ordered[0].cols), dtype=dtype)
    planned = [_job(i, h, decoder, workers, have_sdl) for i, h in enumerate(ordered)]
    outcome = dw.Outcome()
    local = [job for job, remote in planned if not remote]
    remote = [job for job, remote in planned if remote]
    dw.decode_local(local, out, max(1, workers), outcome)
    dw.decode_remote(remote, out, max(1, workers), outcome)
    dw.decode_again_with_pydicom(outcome.crashed + outcome.retry, out, outcome)
    if outcome.overflow:  # the HU range does not fit int16 after all: redo those slices in float32
        out = out.astype(np.float32)
        redo, outcome.overflow = outcome.overflow, []
        dw.decode_again_with_pydicom([j for j in redo if j.method != "raw"], out, outcome)
        dw.decode_local([j for j in redo if j.method == "raw"], out, 1, outcome)
    return out, outcome.errors


# ------------------------------------------------------------------------------------------ metadata


def _age_years(value: Any) -> float | None:
    """PatientAge ('045Y', '006M', '010W', '003D') in years."""
    text = str(value or "").strip().upper()
    units = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) / units[text[-1]]
        return float(text) if text else None
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "\\".join(str(v) for v in value) or None
    return str(value)


def _metadata(ds: Dataset, transfer_syntax: str) -> dict[str, Any]:
    spacing = ds.get("PixelSpacing") or ()
    sex = str(ds.get("PatientSex") or "").strip().upper()
    return {
        "slice_thickness": _float(ds.get("SliceThickness")),
        "pixel_spacing_row": _float(spacing[0]) if len(spacing) > 0 else None,
        "pixel_spacing_col": _float(spacing[1]) if len(spacing) > 1 else None,
        "kvp": _float(ds.get("KVP")),
        "xray_tube_current": _float(ds.get("XRayTubeCurrent")),
        "exposure": _float(ds.get("Exposure")),
        "patient_sex": sex if sex in ("M", "F") else None,
        "patient_age_years": _age_years(ds.get("PatientAge")),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "manufacturer": _text(ds.get("Manufacturer")),
        "convolution_kernel": _text(ds.get("ConvolutionKernel")),
        "transfer_syntax": str(UID(transfer_syntax)),
        "series_uid": _text(ds.get("SeriesInstanceUID")),
    }


def _instance_numbers(ordered: Sequence[_Header]) -> np.ndarray:
    """InstanceNumber per slice; when absent, the numeric file stem, else the 1-based position rank."""
    out = []
    for rank, h in enumerate(ordered, start=1):
        if h.instance_number is not None:
            out.append(h.instance_number)
        elif h.path.stem.isdigit():
            out.append(int(h.path.stem))
        else:
            out.append(rank)
    return np.asarray(out, dtype=np.int64)


def _pixel_spacing(folder: Path, ds: Dataset) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing") or ()
    dy, dx = (_positive(spacing[0]), _positive(spacing[1])) if len(spacing) == 2 else (None, None)
    if not dy or not dx:
        warnings.warn(f"{folder}: no valid PixelSpacing, assuming 1 mm", UserWarning, stacklevel=4)
        return 1.0, 1.0
    return dy, dx


# ------------------------------------------------------------------------------------------ public


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

    def prestart(first: _Header) -> None:
        if _job(0, first, decoder, workers, _dicomsdl_available())[1]:
            dw.get_pool().prestart(max(1, workers))

    scan = _scan(_list_files(folder), on_first=prestart)
    if scan.ignored:
        warnings.warn(f"{folder}: ignoring non-DICOM file(s) {_names(scan.ignored)}", UserWarning, 2)
    if not scan.headers:
        detail = f"; unreadable: {_names(scan.unreadable)}" if scan.unreadable else ""
        raise StudyReadError(f"{folder} contains no readable DICOM slice{detail}")
    _validate(folder, scan.headers)
    ordered, z, _ = _order(folder, scan.headers)
    gaps = _gaps(ordered, z)
    dropped = dict(scan.unreadable)
    _check_losses(folder, max(gaps.missing, len(dropped)), max_missing_slices, dropped, gaps)

    volume, errors = _decode_volume(ordered, workers, decoder)
    if errors:
        dropped.update({ordered[i].path.name: errors[i] for i in sorted(errors)})
        lost = len(errors) + max(gaps.missing, len(scan.unreadable))
        _check_losses(folder, lost, max_missing_slices, dropped, gaps)
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
    ordered: list[_Header],
    volume: np.ndarray,
    z: np.ndarray,
    gaps: _Gaps,
    uid: str | None,
    dropped: list[str],
    ignored: list[str],
) -> Study:
    first = ordered[0]
    instance_numbers = _instance_numbers(ordered)
    steps = np.sign(np.diff(instance_numbers))
    stored_reversed = bool(steps.sum() < 0)
    ds = first.dataset()
    try:
        dy, dx = _pixel_spacing(folder, ds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metadata = _metadata(ds, first.transfer_syntax)
            study_uid = uid or _text(ds.get("StudyInstanceUID")) or folder.name
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
        instance_numbers=instance_numbers,
        z_positions=z.astype(np.float64),
        spacing=(gaps.dz, float(dy), float(dx)),
        positions=np.stack([h.position for h in ordered]),
        orientation=first.orientation.copy(),
        stored_reversed=stored_reversed,
        files=[h.path for h in ordered],
        metadata=metadata,
    )
