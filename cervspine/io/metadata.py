"""What a :class:`Study` records beside its volume: acquisition metadata, instance numbers, pixel spacing."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from cervspine.io.headers import SliceHeader
from cervspine.io.values import as_float, positive, text


def series_metadata(ds: Dataset, transfer_syntax: str) -> dict[str, Any]:
    """The acquisition fields of the first slice (None where absent or invalid)."""
    spacing = ds.get("PixelSpacing") or ()
    sex = str(ds.get("PatientSex") or "").strip().upper()
    return {
        "slice_thickness": as_float(ds.get("SliceThickness")),
        "pixel_spacing_row": as_float(spacing[0]) if len(spacing) > 0 else None,
        "pixel_spacing_col": as_float(spacing[1]) if len(spacing) > 1 else None,
        "kvp": as_float(ds.get("KVP")),
        "xray_tube_current": as_float(ds.get("XRayTubeCurrent")),
        "exposure": as_float(ds.get("Exposure")),
        "patient_sex": sex if sex in ("M", "F") else None,
        "patient_age_years": age_years(ds.get("PatientAge")),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "manufacturer": text(ds.get("Manufacturer")),
        "convolution_kernel": text(ds.get("ConvolutionKernel")),
        "transfer_syntax": str(UID(transfer_syntax)),
        "series_uid": text(ds.get("SeriesInstanceUID")),
    }


def age_years(value: Any) -> float | None:
    """PatientAge ('045Y', '006M', '010W', '003D') in years."""
    age = str(value or "").strip().upper()
    units = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
    try:
        if age and age[-1] in units:
            return float(age[:-1]) / units[age[-1]]
        return float(age) if age else None
    except ValueError:
        return None


def instance_numbers(ordered: Sequence[SliceHeader]) -> np.ndarray:
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


def pixel_spacing(folder: Path, ds: Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm; 1 mm with a warning (at ``load_study``'s caller) when not valid."""
    spacing = ds.get("PixelSpacing") or ()
    dy, dx = (positive(spacing[0]), positive(spacing[1])) if len(spacing) == 2 else (None, None)
    if not dy or not dx:
        warnings.warn(f"{folder}: no valid PixelSpacing, assuming 1 mm", UserWarning, stacklevel=4)
        return 1.0, 1.0
    return dy, dx
