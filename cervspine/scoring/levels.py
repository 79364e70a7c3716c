"""What a study's answer says about each target, in one form for every output: the study-level probability,
the call at the operating point and whether stage 1 found the level. The SR, the SEG, the key images, the
HTML page and the study record all state these, so a reader sees one number per level everywhere."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cervspine import TARGETS
from cervspine.scoring.thresholds import OperatingThreshold

PATIENT = TARGETS[-1]


def format_probability(p: float) -> str:
    """A probability as a reader is shown it: percent, one decimal (``0.8312`` → ``83.1%``)."""
    return f"{100.0 * float(p):.1f}%"


@dataclass(frozen=True)
class LevelAnswer:
    """One target's answer: ``suspected`` and ``threshold`` are None without an operating point;
    ``localised`` is False for a level stage 1 did not find (its probability is the training prior)."""

    target: str
    probability: float
    threshold: float | None
    suspected: bool | None
    localised: bool = True

    @property
    def name(self) -> str:
        """The target as a reader names it: ``C1``…``C7``, ``Patient``."""
        return "Patient" if self.target == PATIENT else self.target

    @property
    def call(self) -> str:
        """``fracture suspected`` / ``not suspected`` / ``no operating point``."""
        if self.suspected is None:
            return "no operating point"
        return "fracture suspected" if self.suspected else "not suspected"

    def sentence(self) -> str:
        """e.g. ``C5: fracture suspected - probability 83.1%, operating point 31.0%``; a level not
        localised says so, and that its number is the prior."""
        where = "" if self.localised else " (level not localised: the training prior)"
        point = "" if self.threshold is None else f", operating point {format_probability(self.threshold)}"
        return f"{self.name}: {self.call} - probability {format_probability(self.probability)}{where}{point}"

    def short(self) -> str:
        """e.g. ``C5: fracture suspected, 83.1%`` (a segment label: at most 64 characters)."""
        return f"{self.name}: {self.call}, {format_probability(self.probability)}"

    def record(self) -> dict[str, Any]:
        """The study record's entry (JSON): the numbers and the sentence the other outputs show."""
        return {
            "target": self.target,
            "probability": self.probability,
            "threshold": self.threshold,
            "fracture_suspected": self.suspected,
            "localised": self.localised,
            "statement": self.sentence(),
        }


def level_answers(
    probabilities: np.ndarray, thresholds: OperatingThreshold | None, not_localised: Sequence[str] = ()
) -> list[LevelAnswer]:
    """The (8,) study probabilities as :class:`LevelAnswer` in ``TARGETS`` order."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (len(TARGETS),):
        raise ValueError(f"expected {len(TARGETS)} probabilities, got shape {probs.shape}")
    limits = thresholds.per_target() if thresholds is not None else [None] * len(TARGETS)
    missing = set(not_localised)
    return [
        LevelAnswer(
            t,
            float(p),
            None if limit is None else float(limit),
            None if limit is None else bool(p > limit),
            t not in missing,
        )
        for t, p, limit in zip(TARGETS, probs, limits)
    ]
