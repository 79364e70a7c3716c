"""Cross-validation folds grouped by study, stratified by patient_overall, derived deterministically."""

from __future__ import annotations

import hashlib

import pandas as pd


def assign_folds(labels: pd.DataFrame, n_folds: int, seed: int) -> pd.Series:
    """StudyInstanceUID-indexed ``labels`` (with patient_overall) → fold number per study.

    Inside each class the studies are ordered by a seeded hash of the uid and dealt round-robin, so the
    folds are balanced and the same for the same studies and seed on every machine.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    key = pd.Series(
        [hashlib.sha1(f"{seed}:{uid}".encode()).hexdigest() for uid in labels.index], index=labels.index
    )
    folds = pd.Series(0, index=labels.index, dtype=int, name="fold")
    strata = labels["patient_overall"] if "patient_overall" in labels else pd.Series(0, index=labels.index)
    for _, group in key.groupby(strata):
        order = group.sort_values().index
        folds.loc[order] = [i % n_folds for i in range(len(order))]
    return folds
