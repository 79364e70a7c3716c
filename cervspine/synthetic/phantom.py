"""Synthetic CT phantoms: one study drawn from a seed (HU volume, vertebra labels, fractures, boxes).

``make_phantom`` builds the anatomy, samples fracture sites and renders the volume slice by slice into a
:class:`SyntheticStudy`, the ground truth in the superior-first order of ``cervspine.io.Study``.

By default (``scan_s=None``, z coverage "fitted") the anatomy is stretched or squeezed along z so that
the stack always covers skull base to T1–T3, whatever the slice count and spacing: tiny test studies keep
every vertebra (the anatomy is then not to scale along z; the DICOM geometry itself is exact). With a
``scan_s`` window (planned by :mod:`.plan`, see :mod:`.coverage`) the anatomy is to scale and the slices
sample exactly that window; fractures are then kept inside it.

Everything the newer options draw comes from extra random streams, so with every option at its default a
study is exactly what the generator has always drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.synthetic.anatomy import LEVELS, Anatomy, build_anatomy, spine_centre
from cervspine.synthetic.coverage import Placement, cut_levels, place_spine
from cervspine.synthetic.fractures import Fracture, make_subtle, sample_fractures, within_scan
from cervspine.synthetic.render import SliceBox, SliceCanvas, draw_slice

UID_ROOT = "1.2.826.0.1.3680043"
PAD_HU = -3024  # outside the reconstruction circle (GE-style padding), signed studies only
HU_RANGE = (-1024, 3071)
_MANUFACTURERS = (
    ("GE MEDICAL SYSTEMS", "BONEPLUS"),
    ("SIEMENS", "B70f"),
    ("TOSHIBA", "FC30"),
    ("Philips", "YC"),
)


@dataclass(frozen=True)
class PhantomParams:
    """What to draw; unset values (None) are drawn from the study's random stream."""

    size: int = 128
    n_slices: int = 120
    slice_spacing: float = 0.8
    fractured: tuple[str, ...] = ()
    uid: str = f"{UID_ROOT}.1"
    fov_mm: float | None = None
    noise_sd: float | None = None
    fov_mask: bool = False
    fracture_gap_mm: tuple[float, float] = (1.5, 4.5)
    fracture_shift_mm: tuple[float, float] = (1.5, 4.5)
    subaxial_shape: str = "graded"  # "uniform": C3–C7 of one shape family (see anatomy)
    neck_outline: str = "levels"  # "random": neck outline and airway not tied to the levels (see anatomy)
    n_thoracic: int = 3  # 4: build T4 too (random z coverage may reach it)
    scan_s: tuple[float, float] | None = None  # to-scale scanned s-range (mm); None: fitted to the stack
    placement: Placement | None = None  # field of view and in-plane spine shift; None: the default draw
    subtle_fraction: float = 0.0  # share of fractured vertebrae drawn subtle (1–2 px at the cache size)
    subtle_cache_size: int = 128  # in-plane size the study is later cached at (sets the subtle pixel)


@dataclass
class SyntheticStudy:
    """A drawn study: ground truth in the superior-first order of ``cervspine.io.Study``."""

    uid: str
    volume: np.ndarray  # (Z, H, W) int16 HU, index 0 most superior
    labels: np.ndarray  # (Z, H, W) uint8: 1..7 C1..C7, 8.. T1..
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    origin: tuple[float, float]  # LPS (x, y) of pixel (0, 0), mm
    z_positions: np.ndarray  # (Z,) LPS z of each slice, strictly decreasing
    fractured: tuple[str, ...]
    fractures: list[Fracture] = field(default_factory=list)
    boxes: list[SliceBox] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    scan_s: tuple[float, float] = (0.0, 0.0)  # anatomical s-range the slices cover, mm
    levels_cut: tuple[str, ...] = ()  # vertebrae shown but only partly inside the scan
    centres: np.ndarray | None = None  # (Z, 2) spine centre per slice, image mm (x = col · dx, y = row · dy)
    slice_s: np.ndarray | None = None  # (Z,) anatomical height of each slice, mm

    def levels_shown(self) -> tuple[str, ...]:
        """Vertebrae labelled on at least one slice, superior first (C1..T4)."""
        present = np.zeros(256, dtype=bool)
        for z in self.labels:  # slice by slice: no sort or widened copy of the whole volume
            present |= np.bincount(z.ravel(), minlength=256) > 0
        return tuple(name for i, name in enumerate(LEVELS) if present[i + 1])

    def targets(self) -> dict[str, int]:
        """C1..C7 and patient_overall, as in train.csv."""
        row = {v: int(v in self.fractured) for v in VERTEBRAE}
        row["patient_overall"] = int(any(row.values()))
        return row


def _streams(rng: np.random.Generator | int) -> list[np.random.Generator]:
    """Independent anatomy, fracture and noise streams, so fracturing changes nothing else; then the
    anatomy-variant and fracture-variant streams of the newer options (the first three are unchanged)."""
    if isinstance(rng, np.random.Generator):
        return rng.spawn(5)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(rng).spawn(5)]


def _anatomy(rng_anat: np.random.Generator, rng_extra: np.random.Generator, params: PhantomParams) -> Anatomy:
    return build_anatomy(
        rng_anat,
        subaxial_shape=params.subaxial_shape,
        n_thoracic=params.n_thoracic,
        rng_extra=rng_extra,
        neck_outline=params.neck_outline,
    )


def study_anatomy(seed: int, params: PhantomParams) -> Anatomy:
    """The anatomy ``make_phantom(seed, params)`` draws (the plan uses it to choose scan windows)."""
    streams = _streams(seed)
    return _anatomy(streams[0], streams[3], params)


def _metadata(rng: np.random.Generator, dz: float) -> dict[str, Any]:
    manufacturer, kernel = _MANUFACTURERS[int(rng.integers(len(_MANUFACTURERS)))]
    window = ((500, 2000), (40, 400), (300, 1500))[int(rng.integers(3))]
    return {
        "PatientSex": str(rng.choice(["M", "F"], p=[0.6, 0.4])),
        "PatientAge": f"{int(rng.integers(18, 95)):03d}Y",
        "KVP": float(rng.choice([100.0, 120.0, 140.0], p=[0.15, 0.7, 0.15])),
        "Manufacturer": manufacturer,
        "ConvolutionKernel": kernel,
        "SliceThickness": _thickness(dz, float(rng.choice([1.0, 1.0, 1.25, 1.6]))),
        "WindowCenter": window[0],
        "WindowWidth": window[1],
    }


def _thickness(dz: float, overlap: float) -> float:
    """Thin slices may be reconstructed overlapping (thickness > spacing); thick ones (≥ 1.5 mm) abut."""
    return round(dz, 3) if dz >= 1.5 else round(dz * overlap, 3)


def make_phantom(rng: np.random.Generator | int, params: PhantomParams = PhantomParams()) -> SyntheticStudy:
    """Draw and render one study. Same seed and params ⇒ identical arrays.

    The fractured set only adds fractures: anatomy and noise do not depend on it.
    """
    unknown = set(params.fractured) - set(VERTEBRAE)
    if unknown:
        raise ValueError(f"fractured must name C1..C7, got {sorted(unknown)}")
    rng_anat, rng_frac, rng_noise, rng_anat_x, rng_frac_x = _streams(rng)
    anat = _anatomy(rng_anat, rng_anat_x, params)
    size, n = params.size, params.n_slices
    fov = params.fov_mm if params.fov_mm is not None else rng_anat.uniform(180, 240)
    place = params.placement
    if place is not None and place.fov_mm is not None:
        fov = place.fov_mm
    px = round(fov / size, 6)
    fov = px * size
    dz = round(params.slice_spacing, 4)
    base = (fov / 2 + rng_anat.uniform(-0.05, 0.05) * fov, fov / 2 + rng_anat.uniform(0.02, 0.10) * fov)
    origin = (round(-fov / 2 + rng_anat.uniform(-10, 10), 3), round(-fov / 2 + rng_anat.uniform(-30, 30), 3))
    z_top = round(rng_anat.uniform(-80, 40), 2)
    noise_sd = params.noise_sd if params.noise_sd is not None else rng_anat.uniform(10, 30)
    metadata = _metadata(rng_anat, dz)
    sites = sample_fractures(rng_frac, anat, params.fracture_gap_mm, params.fracture_shift_mm)
    fractures = {v: sites[v] for v in params.fractured}
    if params.scan_s is None:
        s = anat.s_top + (np.arange(n) + 0.5) * (anat.s_bottom - anat.s_top) / n
        span = anat.s_bottom - anat.s_top
    else:
        s = params.scan_s[0] + (np.arange(n) + 0.5) * dz
        span = n * dz
        margin = min(1.0, 0.25 * dz)
        window = (float(s[0]) - margin, float(s[-1]) + margin)
        fractures = within_scan(
            rng_frac_x, anat, fractures, window, params.fracture_gap_mm, params.fracture_shift_mm
        )
    if params.subtle_fraction > 0:
        fractures = make_subtle(rng_frac_x, fractures, params.subtle_fraction, fov / params.subtle_cache_size)
    if place is not None:
        base = place_spine(anat, s, base, place.shift_mm, fov)
    centres = spine_centre(anat, s, base)
    volume, labels, boxes = render_volume(anat, s, centres, px, size, fractures, rng_noise, noise_sd)
    if params.fov_mask:
        apply_fov_mask(volume)
    metadata.update(noise_sd=float(noise_sd), z_scale=float(n * dz / span))
    step = span / n
    scan_s = (float(s[0] - step / 2), float(s[-1] + step / 2))
    study = SyntheticStudy(
        uid=params.uid,
        volume=volume,
        labels=labels,
        spacing=(dz, px, px),
        origin=origin,
        z_positions=np.round(z_top - np.arange(n) * dz, 4),
        fractured=tuple(v for v in VERTEBRAE if v in params.fractured),
        fractures=[f for v in VERTEBRAE for f in fractures.get(v, [])],
        boxes=boxes,
        metadata=metadata,
        scan_s=scan_s,
        centres=centres,
        slice_s=s,
    )
    shown = study.levels_shown()
    study.levels_cut = tuple(v for v in cut_levels(anat, *scan_s) if v in shown)
    return study


def render_volume(
    anat: Anatomy,
    s: np.ndarray,
    centres: np.ndarray,
    px: float,
    size: int,
    fractures: dict[str, list[Fracture]],
    rng_noise: np.random.Generator,
    noise_sd: float,
) -> tuple[np.ndarray, np.ndarray, list[SliceBox]]:
    """Render slice by slice: int16 HU volume, uint8 labels, fracture boxes."""
    n = s.size
    volume = np.empty((n, size, size), dtype=np.int16)
    labels = np.zeros((n, size, size), dtype=np.uint8)
    img = np.empty((size, size), dtype=np.float32)
    boxes: list[SliceBox] = []
    for i in range(n):
        canvas = SliceCanvas(
            img, labels[i], i, float(s[i]), (float(centres[i, 0]), float(centres[i, 1])), px, anat.hu
        )
        draw_slice(canvas, anat, fractures)
        boxes += canvas.boxes
        img += rng_noise.standard_normal((size, size), dtype=np.float32) * np.float32(noise_sd)
        np.rint(img, out=img)
        np.clip(img, *HU_RANGE, out=img)
        volume[i] = img
    return volume, labels, boxes


def apply_fov_mask(volume: np.ndarray) -> None:
    """Set pixels outside the inscribed reconstruction circle to PAD_HU (in place)."""
    size = volume.shape[-1]
    r = (np.arange(size) - (size - 1) / 2) ** 2
    outside = (r[:, None] + r[None, :]) > (size / 2) ** 2
    volume[:, outside] = PAD_HU
