"""Durable file writes for DICOM objects and the node's spool: temp file in the target folder, fsync,
rename, fsync of the folder; and the UID check that keeps DICOM values out of paths they could escape."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: object) -> bool:
    """A syntactically valid UID (digits and dots, at most 64 characters): safe in a file name."""
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(UID_RE.match(text))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` durably: a reader sees no file or the whole file, also after a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # one per writer
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_dataset_atomic(ds: Dataset, path: Path) -> Path:
    """Save a dataset as a DICOM file (with its file meta information), durably and atomically."""
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return write_bytes_atomic(path, buf.getvalue())
