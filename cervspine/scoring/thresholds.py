"""Operating thresholds: one for C1–C7 and one for patient_overall, chosen (Youden's J) or given.

A prediction is positive when ``p > threshold`` (torchmetrics' convention; see
:func:`cervspine.scoring.metrics.binary_metrics`). Chosen thresholds lie halfway between two neighbouring
predicted scores, so ``>`` and ``>=`` give the same confusion matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cervspine.scoring.competition import N_VERT

YOUDEN_RULE = (
    "Youden's J (TPR − FPR) maximised on the evaluated predictions: one threshold for C1–C7 pooled, "
    "one for patient_overall"
)


@dataclass(frozen=True)
class OperatingThreshold:
    """One threshold for the vertebrae (C1–C7) and one for patient_overall, and how they were chosen."""

    vertebra: float
    patient: float
    rule: str

    def per_target(self) -> np.ndarray:
        """(8,) thresholds in ``TARGETS`` order."""
        return np.array([self.vertebra] * N_VERT + [self.patient], dtype=np.float64)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising TPR − FPR for ``p > threshold``; 0.5 when ``y`` has one class only.

    Candidates are the cuts between consecutive distinct scores (and below the lowest); ties in J go to
    the highest threshold (fewest positives).
    """
    y, p = np.asarray(y, dtype=bool).ravel(), np.asarray(p, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    scores = np.unique(p)[::-1]  # descending; the cut below scores[i] makes every p >= scores[i] positive
    tpr = np.array([(p[y] >= s).sum() for s in scores]) / n_pos
    fpr = np.array([(p[~y] >= s).sum() for s in scores]) / n_neg
    i = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    below = scores[i + 1] if i + 1 < len(scores) else min(0.0, scores[i] - 1e-6)
    return float((scores[i] + below) / 2)


def youden_j(y: np.ndarray, p: np.ndarray, threshold: float) -> float:
    """TPR − FPR of ``p > threshold``."""
    y, pred = np.asarray(y, dtype=bool).ravel(), np.asarray(p).ravel() > threshold
    return float(pred[y].mean() - pred[~y].mean())


def choose_thresholds(y: np.ndarray, p: np.ndarray, given: Any = None) -> OperatingThreshold:
    """The operating thresholds: ``given`` (a float, or a mapping with ``vertebra``/``patient``) when set,
    otherwise Youden's J on (y, p), arrays (n, 8)."""
    if given is not None:
        if isinstance(given, (int, float)):
            v = pt = float(given)
        else:
            v, pt = float(given["vertebra"]), float(given["patient"])
        return OperatingThreshold(v, pt, "given (report_threshold, chosen elsewhere)")
    y, p = np.asarray(y), np.asarray(p)
    return OperatingThreshold(
        youden_threshold(y[:, :N_VERT], p[:, :N_VERT]),
        youden_threshold(y[:, N_VERT], p[:, N_VERT]),
        YOUDEN_RULE,
    )
