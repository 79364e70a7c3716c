"""Planning a synthetic RSNA folder: every study's labels, geometry and storage quirks, from one seed.

``plan_folder`` turns a :class:`FolderSpec` into :class:`StudyPlan` s (decided up front, so studies can
be written in parallel); label and quirk frequencies follow the real train set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.io.rsna import KNOWN_BAD_STUDIES
from cervspine.synthetic.dicom_writer import DicomOptions, transfer_syntax_uid
from cervspine.synthetic.phantom import UID_ROOT, PhantomParams

# Share of all studies with each vertebra fractured in the real train set (C1..C7).
VERTEBRA_WEIGHTS = np.array([0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195])
_N_FRACTURED_P = np.array([0.55, 0.27, 0.12, 0.06])  # 1..4 fractured vertebrae in a positive study
_STANDARD_SPACINGS = (0.5, 0.6, 0.625, 0.7, 0.75, 0.8, 1.0, 1.25)


@dataclass(frozen=True)
class Quirks:
    """How often each storage quirk of the real data occurs (fractions of studies)."""

    reversed: float = 0.3
    number_offset: float = 0.3
    signed: float = 0.5
    zero_intercept: float = 0.3  # of signed studies: intercept 0 instead of -1024
    bits12: float = 0.2  # of unsigned studies: BitsStored 12
    fov_mask: float = 0.2  # of signed studies: -3024 HU outside the reconstruction circle
    transfer_syntax: dict[str, float] = field(
        default_factory=lambda: {
            "explicit": 0.4,
            "implicit": 0.1,
            "jpeg_lossless": 0.3,
            "rle": 0.1,
            "jpeg2000": 0.1,
        }
    )


@dataclass(frozen=True)
class StudyPlan:
    """Everything needed to write one study, decided up front so writing can run in parallel."""

    uid: str
    split: str
    seed: int
    params: PhantomParams
    options: DicomOptions
    segmentation: bool = False
    boxes: bool = False
    seg_noise: float = 0.0


def _spacing(rng: np.random.Generator, lo: float, hi: float) -> float:
    choices = [v for v in _STANDARD_SPACINGS if lo <= v <= hi]
    return float(rng.choice(choices)) if choices else round(float(rng.uniform(lo, hi)), 3)


def _draw_fractured(rng: np.random.Generator) -> tuple[str, ...]:
    k = int(rng.choice(len(_N_FRACTURED_P), p=_N_FRACTURED_P)) + 1
    idx = rng.choice(7, size=k, replace=False, p=VERTEBRA_WEIGHTS / VERTEBRA_WEIGHTS.sum())
    return tuple(VERTEBRAE[i] for i in sorted(idx))


def _draw_options(rng: np.random.Generator, q: Quirks) -> tuple[DicomOptions, bool]:
    """Storage options and whether to pad outside the reconstruction circle."""
    names = list(q.transfer_syntax)
    p = np.array([q.transfer_syntax[k] for k in names], dtype=np.float64)
    ts = names[int(rng.choice(len(names), p=p / p.sum()))]
    rev = bool(rng.random() < q.reversed)
    first = int(rng.integers(2, 400)) if rng.random() < q.number_offset else 1
    signed = bool(rng.random() < q.signed)
    zero = bool(rng.random() < q.zero_intercept)
    bits12 = bool(rng.random() < q.bits12)
    fov = bool(rng.random() < q.fov_mask)
    if signed:
        return DicomOptions(ts, rev, first, True, 0 if zero else -1024, 16), fov
    return DicomOptions(ts, rev, first, False, -1024, 12 if bits12 else 16), False


def _uids(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct RSNA-style UIDs, never one of the real train set's known-bad studies (the default
    config excludes those: a synthetic study with that UID would silently drop out of every run)."""
    pool = max(31000, 20 * n)
    uids = [f"{UID_ROOT}.{1000 + int(v)}" for v in rng.choice(pool, size=n, replace=False)]
    return [f"{UID_ROOT}.{1000 + pool + i}" if u in KNOWN_BAD_STUDIES else u for i, u in enumerate(uids)]


def _positives(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """Exactly round(fraction·n) positives, shuffled (small folders keep both classes)."""
    pos = np.zeros(n, dtype=bool)
    pos[: int(round(fraction * n))] = True
    return rng.permutation(pos)


@dataclass(frozen=True)
class FolderSpec:
    """What ``write_rsna_folder`` makes (see conf/synthesize.yaml for the meaning of each field)."""

    n_train: int = 24
    n_test: int = 4
    size: int = 128
    seed: int = 0
    slices: tuple[int, int] = (100, 140)
    spacing: tuple[float, float] = (0.5, 1.25)
    positive_fraction: float = 0.48
    seg_fraction: float = 0.5
    box_fraction: float = 0.5
    seg_noise: float = 0.0
    quirks: Quirks = field(default_factory=Quirks)
    fracture_gap_mm: tuple[float, float] = (1.5, 4.5)
    fracture_shift_mm: tuple[float, float] = (1.5, 4.5)

    def __post_init__(self) -> None:
        lo, hi = self.slices
        if self.n_train < 0 or self.n_test < 0 or not 2 <= lo <= hi or self.size < 16:
            raise ValueError(
                f"bad sizes: n={self.n_train}+{self.n_test} slices={self.slices} size={self.size}"
            )
        if not self.spacing[0] <= self.spacing[1] or self.spacing[0] <= 0:
            raise ValueError(f"bad spacing range {self.spacing}")


def _plan_split(
    rng: np.random.Generator, spec: FolderSpec, split: str, uids: list[str], offset: int
) -> list[StudyPlan]:
    positive = _positives(rng, len(uids), spec.positive_fraction)
    plans = []
    for i, uid in enumerate(uids):
        fractured = _draw_fractured(rng) if positive[i] else ()
        n_slices = int(rng.integers(spec.slices[0], spec.slices[1] + 1))
        spacing = _spacing(rng, *spec.spacing)
        options, fov = _draw_options(rng, spec.quirks)
        params = PhantomParams(
            spec.size,
            n_slices,
            spacing,
            fractured,
            uid,
            fov_mask=fov,
            fracture_gap_mm=spec.fracture_gap_mm,
            fracture_shift_mm=spec.fracture_shift_mm,
        )
        study_seed = int(np.random.SeedSequence([spec.seed, offset + i]).generate_state(1)[0])
        plans.append(StudyPlan(uid, split, study_seed, params, options, seg_noise=spec.seg_noise))
    return plans


def _subset(rng: np.random.Generator, items: list[int], fraction: float) -> set[int]:
    k = int(round(fraction * len(items)))
    return set(rng.choice(items, size=k, replace=False).tolist()) if k else set()


def plan_folder(spec: FolderSpec) -> list[StudyPlan]:
    """Decide every study of a folder (labels, geometry, storage quirks) from the spec's seed."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 7919]))
    uids = _uids(rng, spec.n_train + spec.n_test)
    plans = _plan_split(rng, spec, "train", uids[: spec.n_train], 0)
    plans += _plan_split(rng, spec, "test", uids[spec.n_train :], spec.n_train)
    train = list(range(spec.n_train))
    seg = _subset(rng, train, spec.seg_fraction)
    boxed = _subset(rng, [i for i in train if plans[i].params.fractured], spec.box_fraction)
    return [replace(p, segmentation=i in seg, boxes=i in boxed) for i, p in enumerate(plans)]


def as_quirks(quirks: Quirks | dict[str, Any] | None) -> Quirks:
    """Quirks from a Quirks, a config mapping (transfer syntax names checked) or None (defaults)."""
    if quirks is None or isinstance(quirks, Quirks):
        return quirks or Quirks()
    q = dict(quirks)
    if "transfer_syntax" in q:
        q["transfer_syntax"] = {str(k): float(v) for k, v in dict(q["transfer_syntax"]).items()}
        for name in q["transfer_syntax"]:
            transfer_syntax_uid(name)
    return Quirks(**q)
