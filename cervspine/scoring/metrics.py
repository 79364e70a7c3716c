"""The competition metric and study-level classification metrics (one implementation of each).

Arrays are (n_studies, 8) with columns ``TARGETS`` = C1…C7, patient_overall. Thresholded metrics count
``p > threshold`` as positive (torchmetrics' convention); :func:`binary_metrics` is vectorised along the
last axis, so bootstrap resamples are scored in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from cervspine import TARGETS, VERTEBRAE
from cervspine.scoring.competition import competition_weights
from cervspine.scoring.thresholds import OperatingThreshold

N_TARGETS = len(TARGETS)
METRICS = ("accuracy", "precision", "recall", "f1", "auroc")

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


def classification_report(y_true: Any, y_pred: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Per-target metrics, their macro average over C1…C7, and the competition score.

    Returns ``{"C1": {...}, …, "patient_overall": {...}, "macro": {...}, "rsna_score": float}``; each
    inner dict has accuracy, precision, recall, f1, auroc (:func:`binary_metrics` at ``threshold``) and
    n_positive. AUROC is NaN when a target has one class only; precision/recall/F1 are 0 when undefined.
    The macro average ignores NaN (NaN if all are).
    """
    t, p = _validate(y_true, y_pred)
    values = binary_metrics(t.T, p.T, threshold)  # one row per target
    report: dict[str, Any] = {
        name: {**{k: float(values[k][j]) for k in METRICS}, "n_positive": float(t[:, j].sum())}
        for j, name in enumerate(TARGETS)
    }
    report["macro"] = {k: _nanmean([report[v][k] for v in VERTEBRAE]) for k in METRICS}
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


def paired_bootstrap_difference(
    y_true: Any, pred_a: Any, pred_b: Any, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """rsna_score(b) − rsna_score(a) on the same studies, and its percentile bootstrap (1 − alpha) interval
    (studies resampled with replacement, both models scored on the same resample). An interval that holds
    0 means the studies cannot tell the two apart."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    diff = study_losses(y_true, pred_b) - study_losses(y_true, pred_a)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n, len(diff)))
    low, high = np.quantile(diff[idx].mean(axis=1), [alpha / 2, 1 - alpha / 2])
    return float(diff.mean()), float(low), float(high)


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
