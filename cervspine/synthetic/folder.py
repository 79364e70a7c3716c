"""Synthetic RSNA 2022 cervical-spine data: CT phantoms written as real DICOM, NIfTI and CSVs.

``make_phantom`` draws one study (HU volume, vertebra labels, fractures, boxes);
``write_study_dicom`` / ``write_segmentation_nifti`` store it the way the RSNA files are stored,
quirks included (reversed slice order, file numbers not starting at 1, JPEG Lossless / RLE /
JPEG 2000 / implicit VR, signed and unsigned pixels); ``write_rsna_folder`` writes a complete
competition-layout folder. Synthetic-only extras: ``test_labels.csv`` (hidden labels of the test
studies, for held-out scoring) and ``synthetic_manifest.csv`` (how each study was stored).

Along z, the anatomy is stretched or squeezed so that the stack always covers skull base to T1–T3,
whatever the slice count and spacing: tiny test studies keep every vertebra (the anatomy is then not
to scale along z; the DICOM geometry itself is exact).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.io.rsna import KNOWN_BAD_STUDIES
from cervspine.synthetic.anatomy import (
    Anatomy,
    Fracture,
    SliceBox,
    SliceCanvas,
    build_anatomy,
    draw_slice,
    sample_fractures,
    spine_centre,
)
from cervspine.synthetic.ljpeg import JPEG_LOSSLESS_SV1, encapsulate_frames, encode_frame

UID_ROOT = "1.2.826.0.1.3680043"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PAD_HU = -3024  # outside the reconstruction circle (GE-style padding), signed studies only
HU_RANGE = (-1024, 3071)
TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "jpeg_lossless": JPEG_LOSSLESS_SV1,
    "rle": "1.2.840.10008.1.2.5",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}
# Share of all studies with each vertebra fractured in the real train set (C1..C7).
VERTEBRA_WEIGHTS = np.array([0.072, 0.141, 0.036, 0.053, 0.080, 0.137, 0.195])
_N_FRACTURED_P = np.array([0.55, 0.27, 0.12, 0.06])  # 1..4 fractured vertebrae in a positive study
_STANDARD_SPACINGS = (0.5, 0.6, 0.625, 0.7, 0.75, 0.8, 1.0, 1.25)
_MANUFACTURERS = (
    ("GE MEDICAL SYSTEMS", "BONEPLUS"),
    ("SIEMENS", "B70f"),
    ("TOSHIBA", "FC30"),
    ("Philips", "YC"),
)


# ---------------------------------------------------------------------------------------------------
# Phantoms


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


# ---------------------------------------------------------------------------------------------------
# DICOM


@dataclass(frozen=True)
class DicomOptions:
    """How a study is stored (the quirks of the RSNA files)."""

    transfer_syntax: str = "explicit"
    reversed: bool = False
    first_number: int = 1
    signed: bool = True
    intercept: int | None = None  # None: -1024
    bits_stored: int = 16


def transfer_syntax_uid(name: str) -> str:
    """A transfer syntax alias (explicit, implicit, jpeg_lossless, rle, jpeg2000) or UID → UID."""
    if name in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[name]
    if name in TRANSFER_SYNTAXES.values():
        return name
    raise ValueError(
        f"unknown transfer syntax {name!r}; use one of {sorted(TRANSFER_SYNTAXES)} or their UIDs"
    )


def file_numbers(n: int, *, reversed: bool = False, first_number: int = 1) -> np.ndarray:
    """Instance (= file) number of each superior-first slice."""
    k = np.arange(n)
    return first_number + (n - 1 - k if reversed else k)


def stored_pixels(volume: np.ndarray, *, signed: bool, intercept: int, bits_stored: int) -> np.ndarray:
    """Stored values for HU = stored + intercept; raises if the HU range does not fit."""
    lo, hi = (
        (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    )
    stored = volume.astype(np.int32) - intercept
    if stored.min() < lo or stored.max() > hi:
        raise ValueError(
            f"HU range [{volume.min()}, {volume.max()}] does not fit {bits_stored}-bit "
            f"{'signed' if signed else 'unsigned'} pixels with intercept {intercept}"
        )
    return stored.astype(np.int16 if signed else np.uint16)


def _slice_dataset(
    study: SyntheticStudy, opts: DicomOptions, ts: str, number: int, index: int, intercept: int
):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    sop = f"{study.uid}.1.{number}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(f"{number}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    md = study.metadata
    dz, dy, dx = study.spacing
    z = float(study.z_positions[index])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.Modality = "CT"
    ds.Manufacturer = md["Manufacturer"]
    ds.PatientName = study.uid
    ds.PatientID = study.uid
    ds.PatientSex = md["PatientSex"]
    ds.PatientAge = md["PatientAge"]
    ds.BodyPartExamined = "CSPINE"
    ds.SliceThickness = md["SliceThickness"]
    ds.KVP = md["KVP"]
    ds.ConvolutionKernel = md["ConvolutionKernel"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = f"{study.uid}.1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = int(number)
    ds.ImagePositionPatient = [study.origin[0], study.origin[1], z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = f"{study.uid}.2"
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = study.volume.shape[1:]
    ds.PixelSpacing = [dy, dx]
    ds.BitsAllocated = 16
    ds.BitsStored = opts.bits_stored
    ds.HighBit = opts.bits_stored - 1
    ds.PixelRepresentation = int(opts.signed)
    ds.WindowCenter = md["WindowCenter"]
    ds.WindowWidth = md["WindowWidth"]
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def _set_pixels(ds, pixels: np.ndarray, ts: str, bits_stored: int) -> None:
    """Store one frame under the transfer syntax (uncompressed, JPEG Lossless, RLE or JPEG 2000)."""
    if ts in (TRANSFER_SYNTAXES["explicit"], TRANSFER_SYNTAXES["implicit"]):
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
    elif ts == JPEG_LOSSLESS_SV1:
        pattern = pixels.view(np.uint16) & np.uint16((1 << bits_stored) - 1)
        ds.PixelData = encapsulate_frames([encode_frame(pattern, bits_stored)])
        ds["PixelData"].VR = "OB"
    else:
        ds.compress(ts, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def write_study_dicom(
    study: SyntheticStudy,
    folder: str | Path,
    *,
    transfer_syntax: str = "explicit",
    reversed: bool = False,
    first_number: int = 1,
    signed: bool = True,
    intercept: int | None = None,
    bits_stored: int = 16,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``<folder>/<number>.dcm`` per slice; returns the paths in superior-first order.

    A folder that already holds ``.dcm`` files is refused, or emptied of them with ``overwrite``.
    """
    opts = DicomOptions(transfer_syntax, reversed, first_number, signed, intercept, bits_stored)
    ts = transfer_syntax_uid(transfer_syntax)
    icpt = -1024 if intercept is None else int(intercept)
    if bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, got {bits_stored}")
    if first_number < 0:
        raise ValueError(f"first_number must be >= 0, got {first_number}")
    stored = stored_pixels(study.volume, signed=signed, intercept=icpt, bits_stored=bits_stored)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("*.dcm"))
    if old and not overwrite:
        raise FileExistsError(f"{folder} already holds {len(old)} .dcm files; pass overwrite=True")
    for path in old:
        path.unlink()
    numbers = file_numbers(len(stored), reversed=reversed, first_number=first_number)
    paths = []
    for i, number in enumerate(numbers):
        ds = _slice_dataset(study, opts, ts, int(number), i, icpt)
        _set_pixels(ds, stored[i], ts, bits_stored)
        path = folder / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------
# NIfTI


def segmentation_affine(study: SyntheticStudy, *, reversed: bool = False) -> np.ndarray:
    """RAS affine of the RSNA-orientation array (W, H, Z): k increasing ⇒ file number decreasing."""
    dz, dy, dx = study.spacing
    rows = study.volume.shape[1]
    z_last = float(study.z_positions[0] if reversed else study.z_positions[-1])  # highest file number
    affine = np.diag([-dx, dy, dz if not reversed else -dz, 1.0])
    affine[:3, 3] = (-study.origin[0], -(study.origin[1] + (rows - 1) * dy), z_last)
    return affine


def to_rsna_orientation(labels: np.ndarray, *, reversed: bool = False) -> np.ndarray:
    """Superior-first (Z, H, W) → RSNA array (W, H, Z) with data[x, y, k] = file_order[Z-1-k, H-1-y, x]."""
    file_order = labels[::-1] if reversed else labels
    return np.ascontiguousarray(file_order[::-1, ::-1, :].transpose(2, 1, 0))


def noisy_labels(labels: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Model-like mask noise: boundaries moved by a smooth random in-plane warp of ~amount pixels."""
    from scipy.ndimage import map_coordinates, zoom

    if amount <= 0:
        return labels
    z, h, w = labels.shape
    coarse = rng.normal(0.0, amount, size=(2, max(2, z // 8), max(2, h // 16), max(2, w // 16)))
    out = np.empty_like(labels)
    grid = np.mgrid[0:h, 0:w].astype(np.float32)
    for k in range(z):
        t = k / max(z - 1, 1) * (coarse.shape[1] - 1)
        k0 = min(int(t), coarse.shape[1] - 2)
        field2 = coarse[:, k0] * (1 - (t - k0)) + coarse[:, k0 + 1] * (t - k0)
        disp = np.stack([zoom(c, (h / c.shape[0], w / c.shape[1]), order=1) for c in field2])
        out[k] = map_coordinates(labels[k], grid + disp[:, :h, :w], order=0, mode="nearest")
    return out


def write_segmentation_nifti(
    study: SyntheticStudy,
    path: str | Path,
    *,
    reversed: bool = False,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Path:
    """Write the labels as an uncompressed uint8 NIfTI in the RSNA array orientation."""
    import nibabel as nib

    labels = study.labels
    if noise > 0:
        labels = noisy_labels(labels, noise, rng if rng is not None else np.random.default_rng(0))
    affine = segmentation_affine(study, reversed=reversed)
    img = nib.Nifti1Image(to_rsna_orientation(labels, reversed=reversed), affine)
    img.set_data_dtype(np.uint8)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_study(
    folder: str | Path,
    *,
    seed: int = 0,
    size: int = 512,
    n_slices: int = 350,
    slice_spacing: float = 0.625,
    fractured: Sequence[str] = ("C2",),
    uid: str | None = None,
    fov_mask: bool = False,
    transfer_syntax: str = "explicit",
    reversed: bool = False,
    first_number: int = 1,
    signed: bool = True,
    intercept: int | None = None,
    bits_stored: int = 16,
    overwrite: bool = False,
) -> SyntheticStudy:
    """Draw one study and write its DICOM folder (for benchmarks and ad-hoc checks)."""
    uid = uid or f"{UID_ROOT}.{seed + 1}"
    params = PhantomParams(size, n_slices, slice_spacing, tuple(fractured), uid, fov_mask=fov_mask)
    study = make_phantom(seed, params)
    write_study_dicom(
        study,
        folder,
        transfer_syntax=transfer_syntax,
        reversed=reversed,
        first_number=first_number,
        signed=signed,
        intercept=intercept,
        bits_stored=bits_stored,
        overwrite=overwrite,
    )
    return study


# ---------------------------------------------------------------------------------------------------
# RSNA folder


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


def write_planned_study(plan: StudyPlan, out: str | Path) -> dict[str, Any]:
    """Render and write one planned study; returns its label row, box rows and counts."""
    out = Path(out)
    study = make_phantom(plan.seed, plan.params)
    images = out / f"{plan.split}_images" / plan.uid
    paths = write_study_dicom(study, images, **asdict(plan.options))
    if plan.segmentation:
        rng = np.random.default_rng(plan.seed)
        write_segmentation_nifti(
            study,
            out / "segmentations" / f"{plan.uid}.nii",
            reversed=plan.options.reversed,
            noise=plan.seg_noise,
            rng=rng,
        )
    numbers = file_numbers(len(paths), reversed=plan.options.reversed, first_number=plan.options.first_number)
    boxes = []
    if plan.boxes:
        for b in study.boxes:
            boxes.append(
                {
                    "StudyInstanceUID": plan.uid,
                    "x": float(b.x),
                    "y": float(b.y),
                    "width": float(b.width),
                    "height": float(b.height),
                    "slice_number": int(numbers[b.slice_index]),
                }
            )
    return {
        "labels": {"StudyInstanceUID": plan.uid, **_reorder(study.targets())},
        "boxes": boxes,
        "files": len(paths),
    }


def _reorder(targets: dict[str, int]) -> dict[str, int]:
    return {"patient_overall": targets["patient_overall"], **{v: targets[v] for v in VERTEBRAE}}


def _run_plans(plans: list[StudyPlan], out: Path, workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(plans) < 2:
        return [write_planned_study(p, out) for p in plans]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(write_planned_study, plans, [out] * len(plans)))


def _write_csvs(out: Path, plans: list[StudyPlan], results: list[dict[str, Any]]) -> None:
    import pandas as pd

    label_cols = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
    train = [r["labels"] for p, r in zip(plans, results) if p.split == "train"]
    test = [r["labels"] for p, r in zip(plans, results) if p.split == "test"]
    pd.DataFrame(train, columns=label_cols).to_csv(out / "train.csv", index=False)
    pd.DataFrame(test, columns=label_cols).to_csv(out / "test_labels.csv", index=False)
    boxes = [b for r in results for b in r["boxes"]]
    box_cols = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    pd.DataFrame(boxes, columns=box_cols).to_csv(out / "train_bounding_boxes.csv", index=False)
    rows = [
        {"row_id": f"{p.uid}_{t}", "StudyInstanceUID": p.uid, "prediction_type": t}
        for p in plans
        if p.split == "test"
        for t in (*VERTEBRAE, "patient_overall")
    ]
    test_df = pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    test_df.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": test_df["row_id"], "fractured": 0.5}).to_csv(
        out / "sample_submission.csv", index=False
    )
    pd.DataFrame([_manifest_row(p) for p in plans]).to_csv(out / "synthetic_manifest.csv", index=False)


def _manifest_row(p: StudyPlan) -> dict[str, Any]:
    o = p.options
    return {
        "StudyInstanceUID": p.uid,
        "split": p.split,
        "seed": p.seed,
        "size": p.params.size,
        "n_slices": p.params.n_slices,
        "slice_spacing": p.params.slice_spacing,
        "fractured": " ".join(p.params.fractured),
        "transfer_syntax": o.transfer_syntax,
        "transfer_syntax_uid": transfer_syntax_uid(o.transfer_syntax),
        "reversed": o.reversed,
        "first_number": o.first_number,
        "signed": o.signed,
        "intercept": -1024 if o.intercept is None else o.intercept,
        "bits_stored": o.bits_stored,
        "fov_mask": p.params.fov_mask,
        "segmentation": p.segmentation,
        "boxes": p.boxes,
    }


def _quirks(quirks: Quirks | dict[str, Any] | None) -> Quirks:
    if quirks is None or isinstance(quirks, Quirks):
        return quirks or Quirks()
    q = dict(quirks)
    if "transfer_syntax" in q:
        q["transfer_syntax"] = {str(k): float(v) for k, v in dict(q["transfer_syntax"]).items()}
        for name in q["transfer_syntax"]:
            transfer_syntax_uid(name)
    return Quirks(**q)


_OUTPUTS = ("train_images", "test_images", "segmentations")


def _prepare(out: Path, overwrite: bool) -> None:
    """Create the output folders; refuse (or, with overwrite, clear) earlier generator output."""
    old = [out / d for d in _OUTPUTS if (out / d).exists() and any((out / d).iterdir())]
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds generated data ({', '.join(p.name for p in old)}); pass overwrite=True"
        )
    for path in old:
        shutil.rmtree(path)
    for d in _OUTPUTS:
        (out / d).mkdir(parents=True, exist_ok=True)


def write_rsna_folder(
    out: str | Path,
    *,
    n_train: int = 24,
    n_test: int = 4,
    size: int = 128,
    seed: int = 0,
    slices: Iterable[int] = (100, 140),
    spacing: Iterable[float] = (0.5, 1.25),
    positive_fraction: float = 0.48,
    seg_fraction: float = 0.5,
    box_fraction: float = 0.5,
    seg_noise: float = 0.0,
    quirks: Quirks | dict[str, Any] | None = None,
    fracture_gap_mm: Iterable[float] = (1.5, 4.5),
    fracture_shift_mm: Iterable[float] = (1.5, 4.5),
    workers: int = 1,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a complete RSNA-layout folder; returns a summary (counts, storage quirks, seconds)."""
    t0 = time.perf_counter()
    spec = FolderSpec(
        n_train,
        n_test,
        size,
        seed,
        _pair(slices, int),
        _pair(spacing, float),
        positive_fraction,
        seg_fraction,
        box_fraction,
        seg_noise,
        _quirks(quirks),
        _pair(fracture_gap_mm, float),
        _pair(fracture_shift_mm, float),
    )
    plans = plan_folder(spec)
    out = Path(out)
    _prepare(out, overwrite)
    results = _run_plans(plans, out, workers)
    _write_csvs(out, plans, results)
    return _summary(out, plans, results, time.perf_counter() - t0)


def _pair(values: Iterable[Any], kind: type) -> tuple[Any, Any]:
    lo, hi = (kind(v) for v in values)
    return lo, hi


def _summary(
    out: Path, plans: list[StudyPlan], results: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    train = [p for p in plans if p.split == "train"]
    return {
        "out": str(out),
        "n_train": len(train),
        "n_test": len(plans) - len(train),
        "n_positive_train": sum(bool(p.params.fractured) for p in train),
        "n_segmentations": sum(p.segmentation for p in plans),
        "n_box_studies": sum(p.boxes for p in plans),
        "n_boxes": sum(len(r["boxes"]) for r in results),
        "n_files": sum(r["files"] for r in results),
        "n_reversed": sum(p.options.reversed for p in plans),
        "transfer_syntaxes": dict(Counter(p.options.transfer_syntax for p in plans)),
        "seconds": round(seconds, 2),
    }


__all__ = [
    "DicomOptions",
    "FolderSpec",
    "PhantomParams",
    "Quirks",
    "StudyPlan",
    "SyntheticStudy",
    "file_numbers",
    "make_phantom",
    "plan_folder",
    "segmentation_affine",
    "to_rsna_orientation",
    "write_planned_study",
    "write_rsna_folder",
    "write_segmentation_nifti",
    "write_study",
    "write_study_dicom",
]
