"""Errors raised by the readers: each message names the file(s) and what is wrong."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class CervspineInputError(ValueError):
    """Bad input data (DICOM, NIfTI, CSV, folder layout)."""


class StudyReadError(CervspineInputError):
    """A DICOM study folder cannot be read into a consistent volume."""


class SegmentationError(CervspineInputError):
    """A NIfTI segmentation does not fit its study."""


class CsvValidationError(CervspineInputError):
    """An RSNA CSV file has missing columns or invalid rows."""


def file_names(paths: Iterable[Path | str], limit: int = 8) -> str:
    """The base names of ``paths`` for a message, the first ``limit`` of them and how many more."""
    names = [Path(p).name for p in paths]
    more = f" … (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
