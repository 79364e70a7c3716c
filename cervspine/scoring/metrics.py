"""The competition metric and study-level classification metrics.

Arrays are (n_studies, 8) with columns ``TARGETS`` = C1…C7, patient_overall.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from cervspine import TARGETS, VERTEBRAE

N_TARGETS = len(TARGETS)
NEGATIVE_WEIGHTS = np.array([1.0] * len(VERTEBRAE) + [7.0])
"""Competition weight of a negative label, per target (C1…C7, patient_overall)."""
POSITIVE_WEIGHTS = 2.0 * NEGATIVE_WEIGHTS
"""Competition weight of a positive label: twice the negative one."""

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def _as_targets(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != N_TARGETS:
        raise ValueError(
            f"{name} must have shape (n_studies, {N_TARGETS}) (C1..C7, patient_overall), got {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no studies")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _validate(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as float64 (n, 8): y_true in {0, 1}, y_pred in [0, 1]."""
    t, p = _as_targets(y_true, "y_true"), _as_targets(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("y_true must contain only 0 and 1")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("y_pred must be probabilities in [0, 1]")
    return t, p


def competition_weights(y_true: np.ndarray) -> np.ndarray:
    """Per-element weights (n, 8): C1…C7 1/2, patient_overall 7/14 (negative/positive)."""
    return np.where(np.asarray(y_true) > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)


def study_losses(y_true: Any, y_pred: Any, eps: float = 1e-7) -> np.ndarray:
    """Per-study weighted log loss Σ w·logloss / Σ w, shape (n_studies,)."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    t, p = _validate(y_true, y_pred)
    p = np.clip(p, eps, 1 - eps)
    logloss = -(t * np.log(p) + (1 - t) * np.log1p(-p))
    w = competition_weights(t)
    return (w * logloss).sum(axis=1) / w.sum(axis=1)


def rsna_score(y_true: Any, y_pred: Any, eps: float = 1e-7) -> float:
    """RSNA 2022 metric (lower is better): mean over studies of the per-study weighted log loss.

    Predictions are clipped to [eps, 1 - eps]; weights are C1…C7 negative 1 / positive 2 and
    patient_overall negative 7 / positive 14. Raises ValueError on bad shapes or values.
    """
    return float(study_losses(y_true, y_pred, eps).mean())


def prior_baseline(y_train: Any, eps: float = 1e-3, optimal: bool = False) -> np.ndarray:
    """Constant prediction (8,) from training labels, clipped to [eps, 1 - eps].

    Default: each target's prevalence. ``optimal=True``: the constant that minimises :func:`rsna_score`
    on ``y_train``, the prevalence weighted by each element's share w / Σ_study w (the metric is
    separable per target for a constant, so this weighted mean is the exact minimiser).
    """
    t = _as_targets(y_train, "y_train")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("y_train must contain only 0 and 1")
    if optimal:
        w = competition_weights(t)
        share = w / w.sum(axis=1, keepdims=True)
        prior = (share * t).sum(axis=0) / share.sum(axis=0)
    else:
        prior = t.mean(axis=0)
    return np.clip(prior, eps, 1 - eps)


def _binary_metrics(target: torch.Tensor, pred: torch.Tensor, threshold: float) -> dict[str, float]:
    t = target.long()
    single_class = bool(t.min() == t.max())
    return {
        "accuracy": float(binary_accuracy(pred, t, threshold=threshold)),
        "precision": float(binary_precision(pred, t, threshold=threshold)),
        "recall": float(binary_recall(pred, t, threshold=threshold)),
        "f1": float(binary_f1_score(pred, t, threshold=threshold)),
        "auroc": float("nan") if single_class else float(binary_auroc(pred, t)),
        "n_positive": float(t.sum()),
    }


def classification_report(y_true: Any, y_pred: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Per-target metrics, their macro average over C1…C7, and the competition score.

    Returns ``{"C1": {...}, …, "patient_overall": {...}, "macro": {...}, "rsna_score": float}``; each
    inner dict has accuracy, precision, recall, f1, auroc (torchmetrics, predictions ≥ threshold are
    positive) and n_positive. AUROC is NaN when a target has one class only; precision/recall/F1 are 0
    when undefined (torchmetrics' zero division). The macro average ignores NaN (NaN if all are).
    """
    t, p = _validate(y_true, y_pred)
    tt, pp = torch.from_numpy(t), torch.from_numpy(p)
    report: dict[str, Any] = {
        name: _binary_metrics(tt[:, j], pp[:, j], threshold) for j, name in enumerate(TARGETS)
    }
    keys = ("accuracy", "precision", "recall", "f1", "auroc")
    report["macro"] = {k: _nanmean([report[v][k] for v in VERTEBRAE]) for k in keys}
    report["rsna_score"] = rsna_score(t, p)
    return report


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr[~np.isnan(arr)].mean()) if (~np.isnan(arr)).any() else float("nan")


def flatten_report(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"C1": {"auroc": x}}`` → ``{prefix + "C1/auroc": x}`` for loggers."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat |= {f"{prefix}{key}/{k}": float(v) for k, v in value.items()}
        else:
            flat[f"{prefix}{key}"] = float(value)
    return flat


def bootstrap_ci(
    y_true: Any,
    y_pred: Any,
    metric_fn: MetricFn = rsna_score,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap (1 − alpha) interval of ``metric_fn(y_true, y_pred)``, resampling studies
    (rows) with replacement ``n`` times. Resamples where the metric is NaN are ignored."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if len(t) != len(p) or len(t) == 0:
        raise ValueError(f"y_true and y_pred need the same non-zero number of studies ({len(t)} vs {len(p)})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), size=(n, len(t)))
    values = np.array([metric_fn(t[i], p[i]) for i in idx], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
