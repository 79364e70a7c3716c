"""Synthetic CT phantoms: one study drawn from a seed (HU volume, vertebra labels, fractures, boxes).

``make_phantom`` builds the anatomy, samples fracture sites and renders the volume slice by slice into a
:class:`SyntheticStudy`, the ground truth in the superior-first order of ``cervspine.io.Study``.

Along z, the anatomy is stretched or squeezed so that the stack always covers skull base to T1–T3,
whatever the slice count and spacing: tiny test studies keep every vertebra (the anatomy is then not
to scale along z; the DICOM geometry itself is exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.synthetic.anatomy import Anatomy, build_anatomy, spine_centre
from cervspine.synthetic.fractures import Fracture, sample_fractures
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

    def targets(self) -> dict[str, int]:
        """C1..C7 and patient_overall, as in train.csv."""
        row = {v: int(v in self.fractured) for v in VERTEBRAE}
        row["patient_overall"] = int(any(row.values()))
        return row


def _streams(rng: np.random.Generator | int) -> list[np.random.Generator]:
    """Independent anatomy, fracture and noise streams, so fracturing changes nothing else."""
    if isinstance(rng, np.random.Generator):
        return rng.spawn(3)
    return [np.random.default_rng(s) for s in np.random.SeedSequence(rng).spawn(3)]


def _metadata(rng: np.random.Generator, dz: float) -> dict[str, Any]:
    manufacturer, kernel = _MANUFACTURERS[int(rng.integers(len(_MANUFACTURERS)))]
    window = ((500, 2000), (40, 400), (300, 1500))[int(rng.integers(3))]
    return {
        "PatientSex": str(rng.choice(["M", "F"], p=[0.6, 0.4])),
        "PatientAge": f"{int(rng.integers(18, 95)):03d}Y",
        "KVP": float(rng.choice([100.0, 120.0, 140.0], p=[0.15, 0.7, 0.15])),
        "Manufacturer": manufacturer,
        "ConvolutionKernel": kernel,
        "SliceThickness": round(dz * float(rng.choice([1.0, 1.0, 1.25, 1.6])), 3),
        "WindowCenter": window[0],
        "WindowWidth": window[1],
    }


def make_phantom(rng: np.random.Generator | int, params: PhantomParams = PhantomParams()) -> SyntheticStudy:
    """Draw and render one study. Same seed and params ⇒ identical arrays.

    The fractured set only adds fractures: anatomy and noise do not depend on it.
    """
    unknown = set(params.fractured) - set(VERTEBRAE)
    if unknown:
        raise ValueError(f"fractured must name C1..C7, got {sorted(unknown)}")
    rng_anat, rng_frac, rng_noise = _streams(rng)
    anat = build_anatomy(rng_anat)
    size, n = params.size, params.n_slices
    fov = params.fov_mm if params.fov_mm is not None else rng_anat.uniform(180, 240)
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
    s = anat.s_top + (np.arange(n) + 0.5) * (anat.s_bottom - anat.s_top) / n
    volume, labels, boxes = render_volume(
        anat, s, spine_centre(anat, s, base), px, size, fractures, rng_noise, noise_sd
    )
    if params.fov_mask:
        apply_fov_mask(volume)
    metadata.update(noise_sd=float(noise_sd), z_scale=float(n * dz / (anat.s_bottom - anat.s_top)))
    return SyntheticStudy(
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
    )


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
