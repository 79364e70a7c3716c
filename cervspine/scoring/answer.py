"""A study's answer and how it is put together from the models' outputs, in numpy: one copy shared by the
torch strategies (:mod:`cervspine.inference`) and a model bundle's runtime (:mod:`cervspine.bundle`),
which imports neither torch nor Lightning.

- :class:`Stage2Result`: one stage-2 model's answer; :class:`StudyPrediction`: the study's, from stage 1
  and every member (:func:`combine_members`: an ensemble is the mean of the members' study logits).
- the slice model's study probability from its per-slice probabilities (:func:`slice_study`:
  aggregation, calibration, the prior for levels stage 1 did not find);
- the sequence model's record of a study (:func:`sequence_result`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cervspine import TARGETS, VERTEBRAE
from cervspine.scoring.aggregation import aggregate_slices, fill_unlocalised, logit_mean

if TYPE_CHECKING:
    from cervspine.data.stage1_table import Stage1Output

ENSEMBLE_RULE = "ensemble: mean of the members' study logits"


@dataclass
class Stage2Result:
    """One model's answer for one study.

    ``fracture_slices``/``fracture_probs`` (n, 7): the slices the model looked at and their per-level
    fracture probabilities (what the reports draw key slices from). ``details``: model-specific facts
    for the study record (JSON-able). ``not_localised``: the levels stage 1 did not find, whose
    probability is the training prior (never an error: the study is still answered).
    """

    probabilities: np.ndarray  # (8,) C1..C7, patient_overall
    fracture_slices: np.ndarray
    fracture_probs: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)
    aggregate_s: float = 0.0  # seconds of slice → study aggregation (timed apart from the model)
    not_localised: list[str] = field(default_factory=list)  # levels answered by the training prior


@dataclass
class StudyPrediction:
    uid: str
    probabilities: np.ndarray  # (8,) C1..C7, patient_overall
    slice_table: pd.DataFrame  # per-slice stage-1 output (the stage-1 table's schema)
    fracture_slices: np.ndarray  # slices scored by (the first) stage 2 (sequence model: the sampled ones)
    fracture_probs: np.ndarray  # (n, 7) their per-level fracture probabilities
    timings: dict[str, float]
    stage2: dict[str, Any] = field(default_factory=dict)  # model-specific details for the study record
    stage1: Stage1Output | None = field(default=None, repr=False)
    not_localised: list[str] = field(default_factory=list)  # levels answered by the training prior

    def as_dict(self) -> dict[str, Any]:
        out = {
            "StudyInstanceUID": self.uid,
            **{t: float(p) for t, p in zip(TARGETS, self.probabilities)},
            "timings_s": self.timings,
            "not_localised": list(self.not_localised),
        }
        if self.not_localised:
            out["fallback"] = (
                f"level not localised: {', '.join(self.not_localised)} answered by the training prior"
            )
        if self.stage2:
            out["stage2"] = self.stage2
        return out


def combine_members(
    study: Any,
    stage1: Stage1Output,
    results: Sequence[Stage2Result],
    members: Sequence[str],
    timings: dict[str, float],
) -> StudyPrediction:
    """The study's answer from stage 1's output and each stage-2 member's result (``members``: each one's
    name in the record, its checkpoint or graph): one member's own, or the members' logit mean."""
    first = results[0]
    if len(results) == 1:
        probs, details = first.probabilities, first.details
    else:
        probs = logit_mean(np.stack([r.probabilities for r in results]))
        rows = [
            {"checkpoint": str(m), **{t: float(v) for t, v in zip(TARGETS, r.probabilities)}}
            for m, r in zip(members, results)
        ]
        details = {"model": ENSEMBLE_RULE, "members": rows}
    missing = sorted({v for r in results for v in r.not_localised}, key=str)
    table = stage1.frame(study)
    return StudyPrediction(
        study.uid,
        probs,
        table,
        first.fracture_slices,
        first.fracture_probs,
        timings,
        details,
        stage1,
        missing,
    )


def ensemble_prior(priors: Sequence[np.ndarray]) -> np.ndarray:
    """(8,) the answer known without looking: one member's training prior, or the members' priors combined
    as their answers are (:func:`combine_members`: the mean of their logits)."""
    if len(priors) == 1:
        return np.asarray(priors[0], dtype=np.float32)
    return logit_mean(np.stack([np.asarray(p, dtype=np.float64) for p in priors]))


def prior_result(prior: np.ndarray, missing: list[str]) -> Stage2Result:
    """The answer when stage 1 found no level: the training prior for every target, flagged."""
    empty = np.zeros((0, len(VERTEBRAE)), dtype=np.float32)
    return Stage2Result(
        np.asarray(prior).astype(np.float32), np.zeros(0, np.int64), empty, not_localised=missing
    )


def localised_levels(visibility: np.ndarray, slices: np.ndarray, threshold: float) -> tuple[np.ndarray, list]:
    """(7,) bool: the levels some scored slice shows (normalised visibility ≥ ``threshold``), and the
    names of the others."""
    localised = np.zeros(len(VERTEBRAE), dtype=bool)
    if len(slices):
        localised = np.asarray(visibility)[slices].max(axis=0) >= threshold
    return localised, [v for v, ok in zip(VERTEBRAE, localised) if not ok]


def slice_study(
    probs: np.ndarray,
    visibility: np.ndarray,
    slices: np.ndarray,
    localised: np.ndarray,
    prior: np.ndarray,
    aggregation: dict[str, Any],
    calibrate: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, float]:
    """The slice model's (8,) study probabilities from its (n, 7) per-slice ``probs`` of ``slices``:
    aggregated (``aggregation``), calibrated (``calibrate``, or None when the checkpoint's calibration does
    not apply), levels not ``localised`` set to the ``prior``; and the seconds it took."""
    t0 = time.perf_counter()
    agg, _ = aggregate_slices(probs, visibility[slices], np.zeros(len(slices)), slices, **aggregation)
    final = calibrate(agg)[0] if calibrate is not None else agg[0]
    return fill_unlocalised(final, localised, prior), time.perf_counter() - t0


def sequence_result(
    probs: np.ndarray, slices: np.ndarray, extents: Sequence[dict[str, Any]], present: np.ndarray
) -> Stage2Result:
    """The sequence model's result from its (8,) study ``probs``, the (7, N) sampled ``slices`` (-1: none)
    and each level's extent record: ``fracture_slices`` the sampled slices (sorted, unique),
    ``fracture_probs[i, v]`` vertebra v's probability where slice i was sampled for v, else 0."""
    missing = [v for v, ok in zip(VERTEBRAE, present) if not ok]
    details = {
        "model": "VertebraSequenceClassifier",
        "vertebrae": {
            v: {"probability": float(probs[i]), **e, "slices": slices[i].tolist()}
            for i, (v, e) in enumerate(zip(VERTEBRAE, extents))
        },
    }
    z = np.unique(slices[slices >= 0])
    per_slice = np.zeros((len(z), len(VERTEBRAE)), dtype=np.float32)
    for v in range(len(VERTEBRAE)):
        per_slice[np.isin(z, slices[v]), v] = probs[v]
    return Stage2Result(probs, z, per_slice, details, not_localised=missing)
