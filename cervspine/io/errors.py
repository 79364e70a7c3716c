"""Errors raised by the readers: each message names the file(s) and what is wrong."""

from __future__ import annotations


class CervspineInputError(ValueError):
    """Bad input data (DICOM, NIfTI, CSV, folder layout)."""


class StudyReadError(CervspineInputError):
    """A DICOM study folder cannot be read into a consistent volume."""


class SegmentationError(CervspineInputError):
    """A NIfTI segmentation does not fit its study."""


class CsvValidationError(CervspineInputError):
    """An RSNA CSV file has missing columns or invalid rows."""
