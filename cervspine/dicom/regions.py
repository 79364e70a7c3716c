"""Where on the source CT the model placed each level, in source pixels: the image region each SR
measurement group points at (stage 1's box on the level's most telling slice) and the level of each slice
that the SEG paints (stage 1's box on every slice of a level)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cervspine import TARGETS, VERTEBRAE
from cervspine.data.stage1_table import BOX_COLS, VIS_COLS

VISIBLE = 0.5  # a slice shows a level where stage 1 gives it this visibility (the stage-1 table's rule)
MIN_BOX_PX = 4.0  # a box narrower than this (an untrained model's) is widened around its centre


@dataclass(frozen=True)
class Region:
    """A rectangle on one source slice: ``box`` = (column0, row0, column1, row1), pixel edges (0 = the
    image's left/top edge). ``localised`` False: the level was not found and the box is the whole slice."""

    slice_index: int
    box: tuple[float, float, float, float]
    localised: bool

    def polyline(self) -> np.ndarray:
        """(5, 2) closed polyline of the box's corners as (column, row), for a DICOM SCOORD."""
        c0, r0, c1, r1 = self.box
        return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float64)


def source_box(box: np.ndarray, rows: int, cols: int) -> tuple[float, float, float, float]:
    """A normalised stage-1 box (y0, x0, y1, x1) of the resized slice → (column0, row0, column1, row1) in
    the source's pixels (the cache only resizes in-plane), ordered, inside the image, ≥ MIN_BOX_PX wide."""
    y0, y1 = sorted(np.clip([box[0], box[2]], 0.0, 1.0) * rows)
    x0, x1 = sorted(np.clip([box[1], box[3]], 0.0, 1.0) * cols)
    out = []
    for lo, hi, size in ((x0, x1, cols), (y0, y1, rows)):
        if hi - lo < MIN_BOX_PX:
            mid = min(max((lo + hi) / 2, MIN_BOX_PX / 2), size - MIN_BOX_PX / 2)
            lo, hi = mid - MIN_BOX_PX / 2, mid + MIN_BOX_PX / 2
        out.append((float(lo), float(hi)))
    (c0, c1), (r0, r1) = out
    return c0, r0, c1, r1


def _shown(table: pd.DataFrame) -> np.ndarray:
    """(Z, 7) bool: slice z shows level v (visibility ≥ VISIBLE) and has a finite stage-1 box."""
    vis = table[VIS_COLS].to_numpy(np.float64)
    boxed = np.isfinite(table[BOX_COLS].to_numpy(np.float64)).all(axis=1)
    return (vis >= VISIBLE) & boxed[:, None]


def level_regions(
    table: pd.DataFrame,
    fracture_slices: np.ndarray,
    fracture_probs: np.ndarray,
    rows: int,
    cols: int,
    *,
    not_localised: Sequence[str] = (),
    key_slice: int | None = None,
) -> dict[str, Region]:
    """Target → its region. A level: stage 1's box on the slice of the level that stage 2 found most
    suspicious (the level's most visible slice where stage 2 scored none of it; where no slice reaches
    VISIBLE, the most visible boxed one). A level in ``not_localised`` (or with no box at all): the whole
    middle slice. The patient level: the box on ``key_slice`` (the report's first key slice), else on the
    most suspicious level's slice."""
    vis = table[VIS_COLS].to_numpy(np.float64)
    boxes = table[BOX_COLS].to_numpy(np.float64)
    boxed = np.isfinite(boxes).all(axis=1)
    shown = _shown(table)
    z_scored = np.asarray(fracture_slices, dtype=np.int64)
    probs = np.asarray(fracture_probs, dtype=np.float64).reshape(len(z_scored), len(VERTEBRAE))
    whole = Region(len(table) // 2, (0.0, 0.0, float(cols), float(rows)), False)
    out: dict[str, Region] = {}
    best: tuple[float, Region] | None = None
    for v, name in enumerate(VERTEBRAE):
        extent = np.flatnonzero(shown[:, v])
        if not len(extent) and boxed.any():
            extent = np.flatnonzero(boxed)[[int(np.argmax(vis[boxed, v]))]]
        if name in not_localised or not len(extent):
            out[name] = whole
            continue
        scored = np.isin(z_scored, extent)
        if scored.any():
            i = np.flatnonzero(scored)[int(np.argmax(probs[scored, v]))]
            z, score = int(z_scored[i]), float(probs[i, v])
        else:
            z, score = int(extent[int(np.argmax(vis[extent, v]))]), -1.0
        out[name] = Region(z, source_box(boxes[z], rows, cols), True)
        if best is None or score > best[0]:
            best = (score, out[name])
    patient = whole if best is None else best[1]
    if key_slice is not None and boxed[int(key_slice)]:
        patient = Region(int(key_slice), source_box(boxes[int(key_slice)], rows, cols), True)
    out[TARGETS[-1]] = patient
    return out


def slice_levels(table: pd.DataFrame) -> np.ndarray:
    """(Z,) int: the level each slice shows as its segment number (1 = C1 … 7 = C7; where two levels meet,
    the more visible one), 0 where stage 1 shows none."""
    shown = _shown(table)
    vis = np.where(shown, table[VIS_COLS].to_numpy(np.float64), -1.0)
    return np.where(shown.any(axis=1), vis.argmax(axis=1) + 1, 0).astype(np.int64)
