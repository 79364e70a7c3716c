"""Checks that a series makes one consistent volume, and the policy for dropped or missing slices."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cervspine.io.errors import StudyReadError, file_names
from cervspine.io.geometry import Gaps
from cervspine.io.headers import SliceHeader

ORIENTATION_TOL = 1e-3  # max abs difference between ImageOrientationPatient values of one series


def validate(folder: Path, headers: list[SliceHeader]) -> None:
    """Modality, one series, one orientation, one slice geometry; raise naming the offending files."""
    not_ct = [h for h in headers if (h.modality or "").upper() != "CT"]
    if not_ct:
        h = not_ct[0]
        more = f" ({len(not_ct)} such files: {file_names(x.path for x in not_ct)})" if len(not_ct) > 1 else ""
        raise StudyReadError(f"{folder}: {h.path.name} has Modality {h.modality!r}, expected 'CT'{more}")
    series = Counter(h.series_uid for h in headers)
    if len(series) > 1:
        listing = "; ".join(f"{uid}: {n} files" for uid, n in series.most_common())
        raise StudyReadError(f"{folder} holds {len(series)} series, expected one: {listing}")
    for name, attr in (("ImagePositionPatient", "position"), ("ImageOrientationPatient", "orientation")):
        lacking = [h.path for h in headers if getattr(h, attr) is None]
        if lacking:
            raise StudyReadError(f"{folder}: no valid {name} in {file_names(lacking)}")
    ref = headers[0]
    odd = [h for h in headers if np.max(np.abs(h.orientation - ref.orientation)) > ORIENTATION_TOL]
    if odd:
        raise StudyReadError(
            f"{folder}: more than one ImageOrientationPatient in the series: {ref.path.name} has "
            f"{ref.orientation.tolist()}, {odd[0].path.name} has {odd[0].orientation.tolist()} "
            f"({len(odd)} files differ: {file_names(h.path for h in odd)})"
        )
    _validate_pixels(folder, headers)


def _validate_pixels(folder: Path, headers: list[SliceHeader]) -> None:
    shapes = Counter((h.rows, h.cols) for h in headers)
    if len(shapes) > 1:
        (main, _), *_ = shapes.most_common()
        odd = [h.path for h in headers if (h.rows, h.cols) != main]
        raise StudyReadError(f"{folder}: slice sizes differ {dict(shapes)}; not {main}: {file_names(odd)}")
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
        raise StudyReadError(f"{folder}: non-finite RescaleSlope/RescaleIntercept in {file_names(odd)}")


def check_losses(folder: Path, lost: int, limit: int, dropped: Mapping[str, str], gaps: Gaps) -> None:
    """Warn about (≤ limit) or refuse (> limit) a study with dropped or missing slices (``dropped``:
    file name → why it could not be read or decoded). The warning points at ``load_study``'s caller."""
    if lost == 0:
        return
    parts = []
    if dropped:
        parts.append(f"unreadable slice file(s): {file_names(dropped, limit=20)} — {_why(dropped)}")
    if gaps.descriptions:
        parts.append("; ".join(gaps.descriptions))
    detail = "; ".join(parts)
    if lost > limit:
        raise StudyReadError(
            f"{folder}: {lost} slice(s) missing or unreadable, more than max_missing_slices={limit}: {detail}"
        )
    warnings.warn(f"{folder}: {lost} slice(s) dropped or missing ({detail})", UserWarning, stacklevel=3)


def _why(reasons: Mapping[str, str], limit: int = 3) -> str:
    """The most common reasons files were dropped, with counts and an example file each."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason or "unknown reason", []).append(name)
    common = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    return "; ".join(f"{len(names)}× {reason} (e.g. {names[0]})" for reason, names in common[:limit])
