"""Study-level predictions of a labelled set: the one contract between a stage-2 model's validation, the
out-of-fold writer (k-fold CV), the W&B images callback and ``cervspine.cv``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cervspine import TARGETS

UID = "StudyInstanceUID"
LABEL_COLUMNS = [f"label_{t}" for t in TARGETS]


@dataclass(frozen=True)
class StudyPredictions:
    """``predictions`` and ``labels`` (n, 8), columns C1…C7, patient_overall, for the studies ``uids``."""

    uids: list[str]
    predictions: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.uids)
        for name in ("predictions", "labels"):
            shape = np.shape(getattr(self, name))
            if shape != (n, len(TARGETS)):
                raise ValueError(f"{name} must be ({n}, {len(TARGETS)}) for {n} studies, got {shape}")

    def to_frame(self, fold: int | None = None) -> pd.DataFrame:
        """The CSV schema: StudyInstanceUID, [fold], C1…patient_overall, label_C1…label_patient_overall."""
        table = pd.DataFrame(np.asarray(self.predictions, dtype=np.float64), columns=list(TARGETS))
        table.insert(0, UID, list(self.uids))
        if fold is not None:
            table.insert(1, "fold", int(fold))
        for i, col in enumerate(LABEL_COLUMNS):
            table[col] = np.asarray(self.labels)[:, i].astype(int)
        return table

    @classmethod
    def from_frame(cls, table: pd.DataFrame, source: str | Path = "table") -> StudyPredictions:
        missing = [c for c in (UID, *TARGETS, *LABEL_COLUMNS) if c not in table.columns]
        if missing:
            raise ValueError(f"{source}: not a study prediction table, missing columns {missing}")
        return cls(
            [str(u) for u in table[UID]],
            table[list(TARGETS)].to_numpy(np.float64),
            table[LABEL_COLUMNS].to_numpy(np.float64),
        )
