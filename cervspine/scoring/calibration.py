"""Study-level calibration: Platt scaling of aggregated probabilities, fitted for the competition metric.

A slice classifier trained on balanced draws and a top-k mean over slices rank studies well but are not
probabilities: a study-level log loss punishes that hard. :class:`StudyCalibration` maps each study
probability ``p`` to ``sigmoid(a · logit(p) + b)``, one ``(a, b)`` shared by C1…C7 and one for
patient_overall, fitted by minimising the competition-weighted log loss (positives ×2) plus a small
ridge pull towards the identity ``(1, 0)``. Four numbers: small validation folds can afford them.
:func:`cross_fitted` scores a fold with calibrations fitted on the other parts of the same fold, so a
logged score never comes from a calibration fitted on the studies it scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from cervspine.scoring.competition import PROBABILITY_EPS, competition_weights
from cervspine.scoring.probability import logit, sigmoid

IDENTITY = (1.0, 0.0, 1.0, 0.0)
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    return logit(p, _EPS)  # a finer clip than the competition's: the fit sees the raw scores


def fit_platt(y: np.ndarray, p: np.ndarray, w: np.ndarray, ridge: float = 1e-2) -> tuple[float, float]:
    """(a, b) minimising Σ w·logloss(y, σ(a·logit(p) + b)) / Σ w + ridge·((a − 1)² + b²)."""
    y, x, w = (np.asarray(v, dtype=np.float64).ravel() for v in (y, _logit(p), w))
    if y.size == 0:
        return 1.0, 0.0
    total = w.sum()

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta
        z = a * x + b
        # log(1 + e^z) − y·z, written stably
        nll = np.logaddexp(0.0, z) - y * z
        g = w * (sigmoid(z) - y) / total
        value = float((w * nll).sum() / total + ridge * ((a - 1) ** 2 + b**2))
        grad = np.array([(g * x).sum() + 2 * ridge * (a - 1), g.sum() + 2 * ridge * b])
        return value, grad

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    a, b = (float(v) for v in res.x)
    return a, b


@dataclass(frozen=True)
class StudyCalibration:
    """``(a_vertebra, b_vertebra, a_overall, b_overall)`` applied to (n, 8) study probabilities."""

    params: tuple[float, float, float, float] = IDENTITY

    @classmethod
    def fit(cls, y_true: np.ndarray, y_pred: np.ndarray, ridge: float = 1e-2) -> StudyCalibration:
        y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
        if y.shape != p.shape or y.ndim != 2 or y.shape[1] != 8:
            raise ValueError(f"y_true {y.shape} and y_pred {p.shape} must both be (n_studies, 8)")
        w = competition_weights(y)
        vert = fit_platt(y[:, :7], p[:, :7], w[:, :7], ridge)
        overall = fit_platt(y[:, 7], p[:, 7], w[:, 7], ridge)
        return cls((*vert, *overall))

    @property
    def is_identity(self) -> bool:
        return tuple(self.params) == IDENTITY

    def __call__(self, y_pred: np.ndarray) -> np.ndarray:
        p = np.asarray(y_pred, dtype=np.float64)
        if self.is_identity:
            return p
        a_v, b_v, a_o, b_o = self.params
        out = np.empty_like(p)
        out[..., :7] = sigmoid(a_v * _logit(p[..., :7]) + b_v)
        out[..., 7] = sigmoid(a_o * _logit(p[..., 7]) + b_o)
        return out


def cross_fitted(
    y_true: np.ndarray, y_pred: np.ndarray, folds: int = 5, seed: int = 0, ridge: float = 1e-2
) -> np.ndarray:
    """Each study calibrated by a :class:`StudyCalibration` fitted on the other folds' studies."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    n = len(y)
    k = min(int(folds), n)
    if k < 2:
        return p.copy()
    part = np.random.default_rng(seed).permutation(n) % k
    out = np.empty_like(p)
    for f in range(k):
        held = part == f
        out[held] = StudyCalibration.fit(y[~held], p[~held], ridge)(p[held])
    return out


NO_SHRINK = (0.0, 0.0)


def group_losses(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """Competition-weighted mean log loss of the C1–C7 group and of patient_overall, (n, 8) arrays."""
    y, p = np.asarray(y_true, dtype=np.float64), np.clip(np.asarray(y_pred, dtype=np.float64), _EPS, 1 - _EPS)
    w = competition_weights(y)
    nll = -(y * np.log(p) + (1 - y) * np.log1p(-p)) * w
    return float(nll[:, :7].sum() / w[:, :7].sum()), float(nll[:, 7].sum() / w[:, 7].sum())


def shrink_weights(
    y_true: np.ndarray,
    y_raw: np.ndarray,
    n0: float = 3.0,
    margin: float = 0.02,
    folds: int = 5,
) -> tuple[float, float]:
    """How far (0–1, in logit space) a fold's calibration pulls its probabilities toward the training prior,
    (C1–C7, patient_overall): ``n0 / (n0 + n)`` for a fold of n studies (a small fold earns less trust),
    and 1 for a group whose cross-fitted calibrated predictions do not beat a cross-fitted constant (the
    competition-optimal prevalence of the other parts) by ``margin`` (relative): the fold says the model
    adds nothing there."""
    y, raw = np.asarray(y_true, dtype=np.float64), np.asarray(y_raw, dtype=np.float64)
    n = len(y)
    if n == 0:
        return 1.0, 1.0
    base = float(n0) / (float(n0) + n)
    model = group_losses(y, cross_fitted(y, raw, folds))
    constant = group_losses(y, cross_fitted(y, np.full_like(raw, 0.5), folds))  # a ≈ 0: the best constant
    return tuple(1.0 if m >= c * (1 - margin) else base for m, c in zip(model, constant))  # type: ignore[return-value]


def shrink(y_pred: np.ndarray, prior: np.ndarray, weights: tuple[float, float]) -> np.ndarray:
    """(n, 8) probabilities pulled toward ``prior`` (8,): ``σ((1 − s)·logit(p) + s·logit(prior))`` with
    s = ``weights[0]`` for C1–C7 and ``weights[1]`` for patient_overall."""
    p = np.asarray(y_pred, dtype=np.float64)
    s_v, s_o = (float(w) for w in weights)
    if s_v == 0.0 and s_o == 0.0:
        return p
    s = np.array([s_v] * 7 + [s_o])
    return sigmoid((1 - s) * _logit(p) + s * _logit(np.asarray(prior, dtype=np.float64)))


def coherent_overall(study_probs: np.ndarray) -> np.ndarray:
    """(…, 8) probabilities with patient_overall raised to at least every level's: P(any fracture) can
    not be below P(C_v). The two groups are calibrated apart, so below the two maps' crossing a
    separately calibrated patient_overall would otherwise fall under the most likely level."""
    p = np.array(study_probs, dtype=np.float64)
    p[..., 7] = np.maximum(p[..., 7], p[..., :7].max(axis=-1))
    return p


def calibrate_study(
    study_probs: np.ndarray,
    params: tuple[float, float, float, float],
    weights: tuple[float, float],
    prior: np.ndarray,
) -> np.ndarray:
    """(n, 8) aggregated study probabilities → calibrated by the Platt ``params``, pulled toward ``prior`` by
    the shrink ``weights``, patient_overall kept at least every level's (:func:`coherent_overall`), clipped
    to the competition's range: the slice model's study calibration (the checkpoint's buffers, or a
    bundle's manifest)."""
    cal = StudyCalibration(tuple(float(v) for v in params))  # type: ignore[arg-type]
    pulled = shrink(cal(study_probs), prior, tuple(float(v) for v in weights))  # type: ignore[arg-type]
    return np.clip(coherent_overall(pulled), PROBABILITY_EPS, 1 - PROBABILITY_EPS)
