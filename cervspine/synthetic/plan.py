"""Planning a synthetic RSNA folder: every study's labels, geometry and storage quirks, from one seed.

``plan_folder`` turns a :class:`FolderSpec` into :class:`StudyPlan` s (decided up front, so studies can
be written in parallel); label and quirk frequencies follow the real train set.

The cue-removing options (``subaxial_shape``, ``z_coverage``, ``fov_mm``/``centre_shift_mm``,
``subtle_fraction``; presets in :mod:`.variants`) draw from per-study streams of their own, so the main
plan stream, and so every default folder, is unchanged. With a to-scale z coverage the plan builds each
study's anatomy, picks the scanned window, derives the slice count (coverage / spacing) and moves a
fracture planned on a vertebra the scan misses (or barely touches) to one it shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.io.rsna import KNOWN_BAD_STUDIES
from cervspine.synthetic.anatomy import NECK_OUTLINES, SUBAXIAL_SHAPES
from cervspine.synthetic.coverage import MIN_FRACTURE_MM, Z_COVERAGES, Placement, scan_window, scanned_mm
from cervspine.synthetic.dicom_writer import DicomOptions, transfer_syntax_uid
from cervspine.synthetic.phantom import UID_ROOT, PhantomParams, study_anatomy

# Share of all studies with each vertebra fractured in the real train set (C1..C7).
VERTEBRA_WEIGHTS = np.array([0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195])
_N_FRACTURED_P = np.array([0.55, 0.27, 0.12, 0.06])  # 1..4 fractured vertebrae in a positive study
_STANDARD_SPACINGS = (0.5, 0.6, 0.625, 0.7, 0.75, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
_VARIANT_STREAM = 52711  # tag of the per-study streams of the cue-removing options
_MIX_STREAM = 52712  # tag of variant=mixed's per-study draw of a variant
MIXED = "mixed"


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
    variant_spec: FolderSpec | None = None  # variant=mixed: the options this study was drawn with


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
    variant: str = "default"  # the preset these options came from (recorded only)
    subaxial_shape: str = "graded"
    neck_outline: str = "levels"
    z_coverage: str = "fitted"
    fov_mm: tuple[float, float] | None = None
    centre_shift_mm: float = 0.0
    subtle_fraction: float = 0.0
    subtle_cache_size: int = 128

    def __post_init__(self) -> None:
        lo, hi = self.slices
        if self.n_train < 0 or self.n_test < 0 or not 2 <= lo <= hi or self.size < 16:
            raise ValueError(
                f"bad sizes: n={self.n_train}+{self.n_test} slices={self.slices} size={self.size}"
            )
        if not self.spacing[0] <= self.spacing[1] or self.spacing[0] <= 0:
            raise ValueError(f"bad spacing range {self.spacing}")
        if self.subaxial_shape not in SUBAXIAL_SHAPES or self.z_coverage not in Z_COVERAGES:
            raise ValueError(
                f"subaxial_shape must be one of {SUBAXIAL_SHAPES} (got {self.subaxial_shape!r}), "
                f"z_coverage one of {Z_COVERAGES} (got {self.z_coverage!r})"
            )
        if self.neck_outline not in NECK_OUTLINES:
            raise ValueError(f"neck_outline must be one of {NECK_OUTLINES} (got {self.neck_outline!r})")
        if self.fov_mm is not None and not 0 < self.fov_mm[0] <= self.fov_mm[1]:
            raise ValueError(f"bad fov_mm range {self.fov_mm}")
        if self.centre_shift_mm < 0 or not 0 <= self.subtle_fraction <= 1 or self.subtle_cache_size < 8:
            raise ValueError(
                f"need centre_shift_mm >= 0, 0 <= subtle_fraction <= 1, subtle_cache_size >= 8; got "
                f"{self.centre_shift_mm}, {self.subtle_fraction}, {self.subtle_cache_size}"
            )

    @property
    def to_scale(self) -> bool:
        """Whether the anatomy is to scale along z (slice count = coverage / spacing)."""
        return self.z_coverage != "fitted"


def _variant_params(spec: FolderSpec, params: PhantomParams, seed: int, key: list[int]) -> PhantomParams:
    """The cue-removing options applied to one study's default params, from the study's own streams."""
    rng_cover, rng_frac, rng_place = (
        np.random.default_rng(s) for s in np.random.SeedSequence([*key, _VARIANT_STREAM]).spawn(3)
    )
    params = replace(
        params,
        subaxial_shape=spec.subaxial_shape,
        neck_outline=spec.neck_outline,
        n_thoracic=4 if spec.z_coverage == "random" else 3,
        subtle_fraction=spec.subtle_fraction,
        subtle_cache_size=spec.subtle_cache_size,
    )
    if spec.fov_mm is not None or spec.centre_shift_mm > 0:
        fov = None if spec.fov_mm is None else round(float(rng_place.uniform(*spec.fov_mm)), 3)
        c = spec.centre_shift_mm
        shift = tuple(float(v) for v in rng_place.uniform(-c, c, size=2)) if c > 0 else (0.0, 0.0)
        params = replace(params, placement=Placement(fov, shift))
    if not spec.to_scale:
        return params
    anat = study_anatomy(seed, params)
    dz = round(params.slice_spacing, 4)
    top, bottom = scan_window(anat, spec.z_coverage, rng_cover)
    n = max(2, int(round((bottom - top) / dz)))
    window = (top, top + n * dz)
    return replace(params, n_slices=n, scan_s=window, fractured=_honest(rng_frac, params, anat, window, dz))


def _honest(rng: np.random.Generator, params: PhantomParams, anat, window, dz: float) -> tuple[str, ...]:
    """The planned fractured set, each vertebra the scan misses (or barely touches) swapped for one it
    shows (dropped when none is left): a label never names a vertebra outside the scan."""
    seen = scanned_mm(anat, window)
    ok = [v for v in VERTEBRAE if seen[v] >= max(MIN_FRACTURE_MM, 1.5 * dz)]
    out = [v for v in params.fractured if v in ok]
    for _ in range(len(params.fractured) - len(out)):
        free = [v for v in ok if v not in out]
        if not free:
            break
        w = np.array([VERTEBRA_WEIGHTS[VERTEBRAE.index(v)] for v in free])
        out.append(free[int(rng.choice(len(free), p=w / w.sum()))])
    return tuple(v for v in VERTEBRAE if v in out)


def _plan_split(
    rng: np.random.Generator, spec: FolderSpec, split: str, uids: list[str], offset: int
) -> list[StudyPlan]:
    positive = _positives(rng, len(uids), spec.positive_fraction)
    plans = []
    folder_spec = spec
    for i, uid in enumerate(uids):
        spec = _study_spec(folder_spec, [folder_spec.seed, offset + i])
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
        if uses_variants(spec):
            params = _variant_params(spec, params, study_seed, [spec.seed, offset + i])
        mixed = spec if folder_spec.variant == MIXED else None
        plans.append(
            StudyPlan(uid, split, study_seed, params, options, seg_noise=spec.seg_noise, variant_spec=mixed)
        )
    return plans


def _study_spec(spec: FolderSpec, key: list[int]) -> FolderSpec:
    """``spec``, or for ``variant=mixed`` the spec of a variant drawn for this study (every named variant
    equally likely: the historic generator, each cue-removing option alone, all of them)."""
    if spec.variant != MIXED:
        return spec
    from cervspine.synthetic.variants import VARIANTS, resolve_options  # variants builds on this module

    names = sorted(VARIANTS)
    rng = np.random.default_rng(np.random.SeedSequence([*key, _MIX_STREAM]))
    name = names[int(rng.integers(len(names)))]
    return replace(spec, variant=name, **resolve_options(name))


_VARIANT_FIELDS = (
    "variant",
    "subaxial_shape",
    "neck_outline",
    "z_coverage",
    "fov_mm",
    "centre_shift_mm",
    "subtle_fraction",
)


def uses_variants(spec: FolderSpec) -> bool:
    """Whether any cue-removing option differs from the historic generator (then the manifest says so)."""
    d = FolderSpec()
    return any(getattr(spec, k) != getattr(d, k) for k in _VARIANT_FIELDS)


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
