"""List a study folder and read the header of every slice file into a :class:`SliceHeader`.

Part 10 files are read with the small strict reader (``_fast_header``); anything it does not handle goes
to pydicom, which leaves PixelData on disk. Each file ends up a slice header, an unreadable slice (named
like DICOM or carrying the ``DICM`` preamble) or an ignored non-DICOM file (DICOMDIRs included).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cervspine.io import _fast_header as fast_header
from cervspine.io.errors import StudyReadError
from cervspine.io.values import as_float, as_int, text, vector

NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".ima"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PIXEL_DATA = 0x7FE00010
_DEFER_BYTES = 256  # pydicom path: leave PixelData (and other big values) on disk


@dataclass
class SliceHeader:
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
class Scan:
    """Result of reading every file's header."""

    headers: list[SliceHeader] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # file name -> reason
    ignored: list[str] = field(default_factory=list)  # clearly not DICOM slices


def list_files(folder: Path) -> list[Path]:
    """The files of a study folder, sorted by name; raises when it is missing, not a folder or empty."""
    if not folder.exists():
        raise StudyReadError(f"study folder {folder} does not exist")
    if not folder.is_dir():
        raise StudyReadError(f"study folder {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise StudyReadError(f"study folder {folder} contains no files")
    return files


def read_headers(files: Iterable[Path], on_first: Callable[[SliceHeader], None] | None = None) -> Scan:
    """Read and classify every file; ``on_first`` is called with the first slice header found."""
    scan = Scan()
    with warnings.catch_warnings():  # pydicom's complaints about odd values; the checks decide
        warnings.simplefilter("ignore")
        for path in files:
            header = _read_one(path, scan)
            if header is not None:
                if on_first is not None and not scan.headers:
                    on_first(header)
                scan.headers.append(header)
    return scan


def _read_one(path: Path, scan: Scan) -> SliceHeader | None:
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


def _read_pydicom(path: Path) -> tuple[SliceHeader | None, str]:
    """The header read by pydicom, or None and why not ("DICOMDIR" for a directory file)."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES, force=True)
        if PIXEL_DATA not in ds:
            return None, "DICOMDIR" if _is_dicomdir(ds) else "no pixel data (truncated?)"
        return _header_pydicom(path, ds), ""
    except Exception as exc:  # noqa: BLE001 - any parse failure makes the file unreadable
        return None, f"{type(exc).__name__}: {exc}"


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(sop or ds.get("SOPClassUID", "")) == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def _header_fast(path: Path, fh: BinaryIO) -> SliceHeader:
    fields = {k: v for k, v in fast_header.read_header(fh).items() if v != ""}
    ts = fields["TransferSyntaxUID"]
    length = fields["PixelDataLength"]
    return _make_header(path, fields.get, ts, fields["PixelDataOffset"], length)


def _header_pydicom(path: Path, ds: Dataset) -> SliceHeader:
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    deferred = getattr(raw, "value", b"") is None and getattr(raw, "value_tell", None) is not None
    defined = deferred and not getattr(raw, "is_undefined_length", False)
    offset, length = (int(raw.value_tell), int(raw.length)) if defined else (None, 0)
    header = _make_header(path, ds.get, _transfer_syntax(ds), offset, length)
    header.ds = ds
    return header


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


def _make_header(
    path: Path, get: Callable[[str], Any], ts: str, offset: int | None, length: int
) -> SliceHeader:
    """A SliceHeader from a field getter (pydicom's ``ds.get`` or the fast reader's ``dict.get``)."""
    rows, cols = as_int(get("Rows"), 0), as_int(get("Columns"), 0)
    bits = as_int(get("BitsAllocated"), 16) or 16
    modality, series = text(get("Modality")), text(get("SeriesInstanceUID"))
    return SliceHeader(
        path=path,
        modality=modality.strip().upper() if modality else None,
        series_uid=series,
        transfer_syntax=ts,
        orientation=vector(get("ImageOrientationPatient"), 6),
        position=vector(get("ImagePositionPatient"), 3),
        instance_number=as_int(get("InstanceNumber")),
        rows=rows,
        cols=cols,
        bits_allocated=bits,
        bits_stored=as_int(get("BitsStored"), bits) or bits,
        signed=as_int(get("PixelRepresentation"), 0) == 1,
        samples=as_int(get("SamplesPerPixel"), 1) or 1,
        frames=as_int(get("NumberOfFrames"), 1) or 1,
        slope=float(as_float(get("RescaleSlope"), 1.0)),
        intercept=float(as_float(get("RescaleIntercept"), 0.0)),
        pixel_offset=_native_offset(ts, rows, cols, bits, offset, length),
    )
