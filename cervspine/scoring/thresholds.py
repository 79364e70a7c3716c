"""Operating thresholds: one for C1–C7 and one for patient_overall, chosen (Youden's J, a sensitivity or
a specificity target) or given; and the operating point of a trained run with its validation
sensitivity and specificity (bootstrap intervals).

A prediction is positive when ``p > threshold`` (torchmetrics' convention; see
:func:`cervspine.scoring.metrics.binary_metrics`). Chosen thresholds lie halfway between two neighbouring
predicted scores, so ``>`` and ``>=`` give the same confusion matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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

    def calls(self, probabilities: np.ndarray) -> np.ndarray:
        """(8,) bool: fracture suspected (p > threshold) per target."""
        return np.asarray(probabilities, dtype=np.float64) > self.per_target()

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
    """The operating thresholds: ``given`` (an :class:`OperatingThreshold`, a float, or a mapping with
    ``vertebra``/``patient``) when set, otherwise Youden's J on (y, p), arrays (n, 8)."""
    if isinstance(given, OperatingThreshold):
        return given
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


# ----------------------------------------------------------------------------- a run's operating point

RULES = ("sensitivity", "specificity", "youden")


def _cut(scores: np.ndarray, i: int) -> float:
    """The threshold just below ``scores[i]`` (descending distinct scores): halfway to the next one."""
    below = scores[i + 1] if i + 1 < len(scores) else min(0.0, scores[i] - 1e-6)
    return float((scores[i] + below) / 2)


def target_threshold(y: np.ndarray, p: np.ndarray, rule: str, target: float | None = None) -> float:
    """The threshold of ``rule`` on (y, p), flattened: ``sensitivity`` — the highest threshold whose
    sensitivity (p > t) reaches ``target``; ``specificity`` — the lowest whose specificity reaches it;
    ``youden`` — :func:`youden_threshold`. 0.5 when ``y`` has one class only."""
    if rule not in RULES:
        raise ValueError(f"operating point rule must be one of {RULES}, got {rule!r}")
    if rule == "youden":
        return youden_threshold(y, p)
    if target is None or not 0 < float(target) <= 1:
        raise ValueError(f"a {rule} target must be in (0, 1], got {target!r}")
    y, p = np.asarray(y, dtype=bool).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if y.all() or not y.any():
        return 0.5
    scores = np.unique(p)[::-1]  # the cut below scores[i] makes every p >= scores[i] positive
    if rule == "sensitivity":
        tpr = np.array([(p[y] >= s).mean() for s in scores])
        return _cut(scores, int(np.argmax(tpr >= float(target) - 1e-12)))
    tnr = np.array([(p[~y] < s).mean() for s in scores])
    ok = np.flatnonzero(tnr >= float(target) - 1e-12)
    if not len(ok):  # even one positive score is too many: nothing is positive
        return float((scores[0] + 1.0) / 2) if scores[0] < 1 else float(scores[0])
    return _cut(scores, int(ok[-1]))


@dataclass(frozen=True)
class LevelPerformance:
    """Sensitivity and specificity of ``p > threshold`` on the studies it was chosen on, with percentile
    bootstrap 95% intervals (studies resampled, the threshold held fixed)."""

    threshold: float
    sensitivity: float
    sensitivity_ci95: tuple[float, float]
    specificity: float
    specificity_ci95: tuple[float, float]
    n_positive: int
    n_negative: int


@dataclass(frozen=True)
class OperatingPoint:
    """A run's operating point: the patient-level threshold of ``rule`` (``target``), the vertebra-level
    one by the same rule on the pooled C1–C7 predictions, and their validation performance."""

    rule: str
    target: float | None
    patient: LevelPerformance
    vertebra: LevelPerformance
    n_studies: int
    n_bootstrap: int
    provenance: dict[str, Any] = field(default_factory=dict)  # where it was chosen (fold, data, file)

    @property
    def description(self) -> str:
        what = "Youden's J" if self.rule == "youden" else f"{self.rule} ≥ {self.target:g}"
        return f"{what} on {self.n_studies} validation studies (patient level; C1–C7 pooled by the same rule)"

    def thresholds(self) -> OperatingThreshold:
        return OperatingThreshold(self.vertebra.threshold, self.patient.threshold, self.description)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.description}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoint:
        def level(x: dict[str, Any]) -> LevelPerformance:
            keys = LevelPerformance.__dataclass_fields__
            return LevelPerformance(
                **{k: tuple(v) if k.endswith("ci95") else v for k, v in x.items() if k in keys}
            )

        return cls(
            str(d["rule"]),
            None if d.get("target") is None else float(d["target"]),
            level(d["patient"]),
            level(d["vertebra"]),
            int(d["n_studies"]),
            int(d.get("n_bootstrap", 0)),
            dict(d.get("provenance") or {}),
        )


def _rates(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity along the last axis (NaN where a class is absent)."""
    pos, neg = y.sum(-1), (~y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pred & y).sum(-1) / pos, (~pred & ~y).sum(-1) / neg


def level_performance(
    y: np.ndarray, p: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0
) -> LevelPerformance:
    """Sensitivity/specificity of ``p > threshold``; ``y``/``p`` (n_studies, k) — k > 1 columns (the
    vertebrae) are pooled, and a bootstrap resample draws whole studies."""
    y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=np.float64)
    y, p = y.reshape(len(y), -1), p.reshape(len(p), -1)
    pred = p > threshold
    sens, spec = _rates(y.ravel(), pred.ravel())
    cis = [(float("nan"), float("nan"))] * 2
    if n_boot > 0 and len(y) > 1:
        idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
        b_sens, b_spec = _rates(y[idx].reshape(n_boot, -1), pred[idx].reshape(n_boot, -1))
        cis = []
        for values in (b_sens, b_spec):
            values = values[~np.isnan(values)]
            lo, hi = np.quantile(values, [0.025, 0.975]) if values.size else (np.nan, np.nan)
            cis.append((float(lo), float(hi)))
    return LevelPerformance(
        float(threshold), float(sens), cis[0], float(spec), cis[1], int(y.sum()), int((~y).sum())
    )


def choose_operating_point(
    y: np.ndarray,
    p: np.ndarray,
    rule: str = "sensitivity",
    target: float | None = 0.9,
    n_boot: int = 1000,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> OperatingPoint:
    """The operating point of ``rule`` on validation labels ``y`` and predictions ``p`` (n, 8): the
    patient-level threshold reaching ``target`` (sensitivity or specificity; unused for ``youden``),
    the vertebra-level one by the same rule on C1–C7 pooled, each with its bootstrap intervals."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != N_VERT + 1 or y.shape != p.shape:
        raise ValueError(f"labels and predictions must both be (n, {N_VERT + 1}); got {y.shape}, {p.shape}")
    target = None if rule == "youden" else target
    t_pat = target_threshold(y[:, N_VERT], p[:, N_VERT], rule, target)
    t_vert = target_threshold(y[:, :N_VERT], p[:, :N_VERT], rule, target)
    return OperatingPoint(
        rule,
        None if target is None else float(target),
        level_performance(y[:, N_VERT], p[:, N_VERT], t_pat, n_boot, seed),
        level_performance(y[:, :N_VERT], p[:, :N_VERT], t_vert, n_boot, seed),
        int(len(y)),
        int(n_boot),
        dict(provenance or {}),
    )


def calls_record(thresholds: OperatingThreshold | None, probabilities: np.ndarray) -> dict[str, Any]:
    """A study record's ``operating_point`` entry: the thresholds, their rule and the call per target."""
    from cervspine import TARGETS

    if thresholds is None:
        return {"thresholds": None, "note": "no operating point (run evaluate, or give operating_point=)"}
    calls = thresholds.calls(probabilities)
    return {
        "vertebra": thresholds.vertebra,
        "patient": thresholds.patient,
        "rule": thresholds.rule,
        "fracture_suspected": {t: bool(c) for t, c in zip(TARGETS, calls)},
    }
