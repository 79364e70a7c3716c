"""The stage-1 prediction table (Parquet): per-slice vertebra probabilities and spine boxes, and one
study's rows of it as arrays (:class:`Stage1Output`, what every stage-1 strategy returns)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cervspine import VERTEBRAE
from cervspine.cache.study import CachedStudy

VIS_COLS = [f"vis_{v}" for v in VERTEBRAE]
BOX_COLS = ["box_y0", "box_x0", "box_y1", "box_x1"]
COLUMNS = ["StudyInstanceUID", "slice_index", "instance_number", *VIS_COLS, *BOX_COLS]


@dataclass(frozen=True)
class Stage1Output:
    """Raw stage-1 outputs of one study: visibility (Z, 7) in [0, 1] and spine boxes (Z, 4), normalised
    (y0, x0, y1, x1), NaN on slices where no cervical level reaches 0.5."""

    visibility: np.ndarray
    boxes: np.ndarray

    def frame(self, study: CachedStudy) -> pd.DataFrame:
        """The study's rows of the stage-1 table (``stage1_predictions.parquet``'s schema)."""
        df = pd.DataFrame(self.visibility, columns=VIS_COLS)
        df[BOX_COLS] = self.boxes
        df.insert(0, "instance_number", np.asarray(study.meta["instance_numbers"], dtype=np.int64))
        df.insert(0, "slice_index", np.arange(study.num_slices))
        df.insert(0, "StudyInstanceUID", study.uid)
        return df[COLUMNS]

    @classmethod
    def from_frame(cls, table: pd.DataFrame) -> Stage1Output:
        return cls(table[VIS_COLS].to_numpy(np.float32), table[BOX_COLS].to_numpy(np.float32))

    def masked(self) -> Stage1Output:
        """Boxes set to NaN on slices where no level reaches 0.5 (the table's convention)."""
        boxes = np.array(self.boxes, dtype=np.float32, copy=True)
        boxes[self.visibility.max(axis=1) < 0.5] = np.nan
        return Stage1Output(self.visibility, boxes)


def read_stage1(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uid → (visibility (Z, 7), boxes (Z, 4) with NaN where no spine was found)."""
    df = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a stage-1 prediction table, missing columns {missing}")
    out = {}
    for uid, g in df.groupby("StudyInstanceUID", sort=False):
        g = g.sort_values("slice_index")
        if not np.array_equal(g["slice_index"].to_numpy(), np.arange(len(g))):
            raise ValueError(f"{path}: study {uid} does not have exactly one row per slice 0..Z-1")
        out[str(uid)] = (g[VIS_COLS].to_numpy(np.float32), g[BOX_COLS].to_numpy(np.float32))
    return out


def vertebra_extents(df: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per study and level: first/last slice index where the level's probability passes ``threshold``."""
    rows = []
    for uid, g in df.groupby("StudyInstanceUID", sort=False):
        g = g.sort_values("slice_index")
        for v, col in zip(VERTEBRAE, VIS_COLS):
            hit = g["slice_index"].to_numpy()[g[col].to_numpy() >= threshold]
            rows.append(
                {
                    "StudyInstanceUID": uid,
                    "vertebra": v,
                    "present": bool(len(hit)),
                    "first_slice": int(hit.min()) if len(hit) else -1,
                    "last_slice": int(hit.max()) if len(hit) else -1,
                    "n_slices": int(len(hit)),
                }
            )
    return pd.DataFrame(rows)
