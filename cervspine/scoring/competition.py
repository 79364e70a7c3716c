"""The RSNA 2022 competition's constants: target weights, the training set's prevalences, the clip.

Columns are ``TARGETS`` = C1…C7, patient_overall. The metric weighs a positive label twice a negative
one: C1–C7 1/2, patient_overall 7/14.
"""

from __future__ import annotations

import numpy as np

from cervspine import VERTEBRAE

N_VERT = len(VERTEBRAE)
VERTEBRA_WEIGHTS = (1.0, 2.0)
"""(negative, positive) weight of each of C1…C7."""
OVERALL_WEIGHTS = (7.0, 14.0)
"""(negative, positive) weight of patient_overall."""
NEGATIVE_WEIGHTS = np.array([VERTEBRA_WEIGHTS[0]] * N_VERT + [OVERALL_WEIGHTS[0]])
POSITIVE_WEIGHTS = np.array([VERTEBRA_WEIGHTS[1]] * N_VERT + [OVERALL_WEIGHTS[1]])

RSNA_PREVALENCE = (0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195, 0.476)
"""Share of the 2,019 RSNA train studies with each of C1…C7 fractured, and with any fracture."""

PROBABILITY_EPS = 1e-4
"""Study probabilities are kept inside [eps, 1 − eps] (what the Kaggle submission and the models clip to)."""


def competition_weights(y_true: np.ndarray) -> np.ndarray:
    """Per-element weights (n, 8) of (n, 8) labels: C1…C7 1/2, patient_overall 7/14 (negative/positive)."""
    return np.where(np.asarray(y_true) > 0.5, POSITIVE_WEIGHTS, NEGATIVE_WEIGHTS)
