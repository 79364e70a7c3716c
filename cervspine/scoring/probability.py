"""The small arithmetic of probabilities, in one place: logit and sigmoid with the competition's clip, and
the noisy-or of independent per-vertebra probabilities (P(any fracture))."""

from __future__ import annotations

import numpy as np

from cervspine.scoring.competition import PROBABILITY_EPS


def logit(p: np.ndarray, eps: float = PROBABILITY_EPS) -> np.ndarray:
    """log(p / (1 − p)), ``p`` clipped to [eps, 1 − eps] first (float64)."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^−x), in the tanh form that does not overflow (float64)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def noisy_or(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """1 − Π (1 − p) along ``axis``: P(any) if the events were independent; never below the largest p
    (1 − (1 − p) can round a hair below p; the bound holds exactly, so it is kept exactly)."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.maximum(1.0 - np.prod(1.0 - probs, axis=axis), np.max(probs, axis=axis))
