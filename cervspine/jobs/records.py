"""What predicting writes, torch-free (shared by :mod:`cervspine.jobs.predict` and a bundle's runtime,
:mod:`cervspine.bundle`): a study's record (``studies/<uid>.json``) and the Kaggle submission frame."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cervspine import TARGETS
from cervspine.data.stage1_table import vertebra_extents
from cervspine.scoring.answer import StudyPrediction
from cervspine.scoring.competition import PROBABILITY_EPS
from cervspine.scoring.levels import level_answers
from cervspine.scoring.thresholds import OperatingThreshold, calls_record


def study_record(pred: StudyPrediction, thresholds: OperatingThreshold | None = None) -> dict[str, Any]:
    """The study's answer, its detected extents, the calls at the operating point and, per target, the
    statement every other output shows (``levels``)."""
    extents = vertebra_extents(pred.slice_table).drop(columns="StudyInstanceUID")
    answers = level_answers(pred.probabilities, thresholds, pred.not_localised)
    return {
        **pred.as_dict(),
        "vertebra_extents": extents.to_dict(orient="records"),
        "operating_point": calls_record(thresholds, pred.probabilities),
        "levels": [a.record() for a in answers],
    }


def submission_frame(test: pd.DataFrame, predictions: dict[str, np.ndarray]) -> pd.DataFrame:
    """test.csv rows → (row_id, fractured), probabilities strictly inside (0, 1)."""
    col = {t: i for i, t in enumerate(TARGETS)}
    values = [
        float(predictions[u][col[t]]) for u, t in zip(test["StudyInstanceUID"], test["prediction_type"])
    ]
    fractured = np.clip(values, PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    return pd.DataFrame({"row_id": test["row_id"].to_numpy(), "fractured": fractured})
