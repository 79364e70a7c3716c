"""Slice geometry of a series: the superior slice normal, the slice order along it, spacing and gaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cervspine.io.errors import StudyReadError, file_names
from cervspine.io.headers import SliceHeader
from cervspine.io.values import positive

DUPLICATE_TOL_MM = 1e-2
GAP_FACTOR = 1.5


def superior_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal row × column, flipped so that it points superior (+z LPS) when it has a z part."""
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise StudyReadError(f"degenerate ImageOrientationPatient {orientation.tolist()}")
    normal /= norm
    return -normal if normal[2] < 0 else normal


def order_slices(
    folder: Path, headers: list[SliceHeader]
) -> tuple[list[SliceHeader], np.ndarray, np.ndarray]:
    """Headers sorted superior → inferior, their projections on the normal, and the normal."""
    normal = superior_normal(headers[0].orientation)
    proj = np.array([h.position @ normal for h in headers])
    if not np.all(np.isfinite(proj)):
        odd = [h.path for h, p in zip(headers, proj) if not np.isfinite(p)]
        raise StudyReadError(f"{folder}: ImagePositionPatient out of range in {file_names(odd)}")
    ranks = np.argsort(-proj, kind="stable")
    ordered = [headers[i] for i in ranks]
    z = proj[ranks]
    dup = np.flatnonzero(np.abs(np.diff(z)) < DUPLICATE_TOL_MM)
    if dup.size:
        a, b = ordered[dup[0]], ordered[dup[0] + 1]
        raise StudyReadError(
            f"{folder}: {a.path.name} and {b.path.name} have the same slice position "
            f"({z[dup[0]]:.3f} mm along the normal); {dup.size} duplicate position(s) in all"
        )
    return ordered, z, normal


@dataclass
class Gaps:
    """The slice spacing and the slices missing from the series."""

    dz: float
    missing: int
    descriptions: list[str]


def find_gaps(ordered: list[SliceHeader], z: np.ndarray) -> Gaps:
    """Median slice spacing and the slices missing where a step exceeds GAP_FACTOR × the median."""
    if len(z) < 2:
        ds = ordered[0].dataset()
        try:
            dz = positive(ds.get("SpacingBetweenSlices"), ds.get("SliceThickness")) or 1.0
        except Exception as exc:  # a value pydicom cannot convert (corrupt VR or length)
            raise StudyReadError(f"{ordered[0].path}: cannot read the slice spacing ({exc})") from exc
        return Gaps(float(dz), 0, [])
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
    return Gaps(dz, missing, descriptions)
