"""The metadata vector of the fracture model's metadata branch.

Every feature is normalised with fixed reference values (so a model's inputs mean the same on every
data set) and each optional DICOM value comes with an explicit "missing" indicator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cervspine import VERTEBRAE

# name → (reference centre, reference scale); value = (x - centre) / scale
_NUMERIC = {
    "slice_thickness": (1.0, 0.5),
    "pixel_spacing": (0.35, 0.15),
    "num_slices": (300.0, 150.0),
    "kvp": (120.0, 20.0),
    "patient_age_years": (55.0, 20.0),
    "xray_tube_current": (300.0, 200.0),
}

STUDY_FEATURES = (
    *_NUMERIC,
    *(f"{k}_missing" for k in _NUMERIC),
    "stored_reversed",
    "sex_male",
    "sex_female",
)
SLICE_FEATURES = ("slice_position", *(f"vis_{v}" for v in VERTEBRAE))
FEATURES = (*SLICE_FEATURES, *STUDY_FEATURES)
NUM_FEATURES = len(FEATURES)


def _raw_value(meta: dict[str, Any], name: str) -> float | None:
    md = meta.get("metadata", {})
    if name == "pixel_spacing":
        v = md.get("pixel_spacing_row")
    elif name == "num_slices":
        v = meta.get("original_shape", [None])[0]
    else:
        v = md.get(name)
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def study_features(meta: dict[str, Any]) -> np.ndarray:
    """The study part of the vector, from a cache entry's meta.json."""
    values, missing = [], []
    for name, (centre, scale) in _NUMERIC.items():
        v = _raw_value(meta, name)
        values.append(0.0 if v is None else (v - centre) / scale)
        missing.append(1.0 if v is None else 0.0)
    sex = (meta.get("metadata", {}).get("patient_sex") or "").upper()
    flags = [float(bool(meta.get("stored_reversed"))), float(sex == "M"), float(sex == "F")]
    return np.clip(np.asarray(values + missing + flags, dtype=np.float32), -5.0, 5.0)


def slice_features(z: int, num_slices: int, visibility: np.ndarray) -> np.ndarray:
    """Normalised slice position (0 = most superior) and the 7 vertebra visibilities."""
    pos = z / max(num_slices - 1, 1)
    return np.concatenate([[pos], np.asarray(visibility, dtype=np.float32)]).astype(np.float32)
