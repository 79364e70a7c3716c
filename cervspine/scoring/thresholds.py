"""The operating threshold (Youden's J) and vectorised bootstrap intervals of thresholded metrics.

A prediction is positive when ``p > threshold`` (torchmetrics' convention, so point estimates agree with
:func:`cervspine.scoring.metrics.classification_report`). Chosen thresholds lie halfway between two
neighbouring
predicted scores, so ``>`` and ``>=`` give the same confusion matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from cervspine import TARGETS, VERTEBRAE

METRICS = ("accuracy", "precision", "recall", "f1", "auroc")
N_VERT = len(VERTEBRAE)
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


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Accuracy, precision, recall, F1 and AUROC along the last axis (so (B, n) gives B values each).

    Undefined precision/recall/F1 are 0 (torchmetrics' zero division); AUROC is NaN with one class.
    """
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=np.float64)
    pred = p > threshold
    tp = (pred & y).sum(-1).astype(np.float64)
    fp = (pred & ~y).sum(-1).astype(np.float64)
    fn = (~pred & y).sum(-1).astype(np.float64)
    n = y.shape[-1]
    n_pos = y.sum(-1).astype(np.float64)
    n_neg = n - n_pos

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    precision, recall = div(tp, tp + fp), div(tp, tp + fn)
    ranks = rankdata(p, axis=-1)  # average ranks: ties count one half, as the trapezoidal ROC area does
    rank_pos = (ranks * y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = (rank_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auroc = np.where((n_pos > 0) & (n_neg > 0), auroc, np.nan)
    return {
        "accuracy": (n - fp - fn) / n,
        "precision": precision,
        "recall": recall,
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "auroc": auroc,
    }


def bootstrap_table(
    y: np.ndarray,
    p: np.ndarray,
    thresholds: OperatingThreshold,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Per target: each metric's point estimate and percentile-bootstrap (1 − alpha) interval.

    Studies (rows) are resampled with replacement, the same resamples for every target; resamples where
    a metric is undefined (AUROC with one class) are left out of its interval.
    """
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    table: dict[str, dict[str, Any]] = {}
    for j, (name, t) in enumerate(zip(TARGETS, thresholds.per_target())):
        point = binary_metrics(y[:, j], p[:, j], t)
        boot = binary_metrics(y[idx, j], p[idx, j], t)
        row: dict[str, Any] = {"threshold": float(t), "n_positive": int(y[:, j].sum()), "n": len(y)}
        for m in METRICS:
            values = boot[m][~np.isnan(boot[m])]
            lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2]) if values.size else (np.nan, np.nan)
            row[m] = float(point[m])
            row[f"{m}_ci95"] = [float(lo), float(hi)]
        table[name] = row
    return table
