"""DICOM element values (pydicom's or the fast reader's raw strings) as plain Python/numpy values.

Every function returns a default (or None) for an absent or invalid value instead of raising: the
callers decide whether a missing value is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def as_float(value: Any, default: float | None = None) -> float | None:
    """A DICOM numeric value (first of a multi-value) as float, ``default`` when absent or invalid."""
    if isinstance(value, str) and "\\" in value:
        value = value.split("\\")
    if value is None or value == "":
        return default
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0] if len(value) else None
        return as_float(value, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def as_int(value: Any, default: int | None = None) -> int | None:
    """An integral DICOM value (IS/US/SL/UL: within 32 bits), ``default`` when absent or invalid."""
    number = as_float(value)
    if number is None or not number.is_integer() or not -(2**31) <= number < 2**32:
        return default
    return int(number)


def positive(*values: Any) -> float | None:
    """The first value that is a finite number > 0, else None."""
    for value in values:
        number = as_float(value)
        if number is not None and np.isfinite(number) and number > 0:
            return number
    return None


def vector(value: Any, n: int) -> np.ndarray | None:
    """A multi-value of ``n`` finite numbers as a float64 array, else None."""
    if isinstance(value, str):
        value = value.split("\\")
    try:
        vec = np.array([float(v) for v in value or ()], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return vec if vec.shape == (n,) and np.all(np.isfinite(vec)) else None


def text(value: Any) -> str | None:
    """A value as text (a multi-value joined with backslashes), None when absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return "\\".join(str(v) for v in value) or None
    return str(value)
