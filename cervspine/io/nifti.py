"""Align an RSNA NIfTI segmentation (labels 1–7 = C1–C7, 8–19 = T1–T12) with its :class:`Study` volume.

Two ways to find the alignment:

* **geometry** — map each NIfTI voxel axis to a volume axis from the NIfTI affine (RAS, turned into
  DICOM's LPS) and the study's orientation, then check that the NIfTI's corner voxel sits on the volume's
  first voxel and that its slice positions match ``study.z_positions``;
* **recipe** — the competition's array recipe ``seg[:, ::-1, ::-1].transpose(2, 1, 0)``, which gives the
  slices in file-number (ascending InstanceNumber) order, then the permutation from that order to the
  volume's superior-first order computed from ``study.instance_numbers``.

"auto" uses the geometry when the affine is informative, checks that the recipe agrees whenever the file
is in the RSNA layout, and falls back to the recipe (with a warning) when the affine carries no geometry.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from cervspine.io.errors import SegmentationError
from cervspine.io.geometry import superior_normal
from cervspine.io.study import Study

__all__ = ["load_segmentation", "MAX_LABEL", "METHODS"]

MAX_LABEL = 19
METHODS = ("auto", "geometry", "recipe")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
AXIS_COS_MIN = 0.9  # |cos| between a NIfTI axis and the volume axis it maps to
SPACING_RTOL = 0.02
RSNA_AXES = (2, 1, 0)  # volume axis (z, y, x) ← NIfTI axis, in the RSNA file layout
_CHUNK = 16


class _Mismatch(Exception):
    """The affine does not describe the study's grid (message: why)."""


def _where(path: Path, study: Study) -> str:
    return f"segmentation {path} vs study {study.folder}"


def _labels(img: nib.spatialimages.SpatialImage, path: Path, study: Study) -> np.ndarray:
    """The label array in file layout as uint8; labels must be integers in 0..MAX_LABEL."""
    proxy = img.dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    unscaled = (np.isnan(slope) or slope == 1.0) and (np.isnan(inter) or inter == 0.0)
    # the stored integers as they are: no float64 copy from get_fdata / scaling
    raw = proxy.get_unscaled() if unscaled and hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise SegmentationError(f"{_where(path, study)}: expected a 3-D label volume, got shape {raw.shape}")
    if raw.dtype.kind not in "biuf":
        raise SegmentationError(f"{_where(path, study)}: labels of dtype {raw.dtype} are not integers")
    if raw.dtype.kind == "f":
        for i in range(0, raw.shape[-1], _CHUNK):
            part = raw[..., i : i + _CHUNK]
            if not np.all(np.isfinite(part)) or np.any(part != np.rint(part)):
                raise SegmentationError(f"{_where(path, study)}: non-integer label values")
    lo, hi = (raw.min(), raw.max()) if raw.size else (0, 0)
    if lo < 0 or hi > MAX_LABEL:
        raise SegmentationError(
            f"{_where(path, study)}: labels must lie in 0..{MAX_LABEL}, found range {lo}..{hi}"
        )
    return raw.astype(np.uint8)


def _informative(img: nib.spatialimages.SpatialImage) -> bool:
    """False for an affine without real-world meaning: no sform/qform code, singular, or identity-like."""
    header = img.header
    codes = [int(header[k]) for k in ("sform_code", "qform_code") if k in header]
    if codes and not any(codes):
        return False
    affine = np.asarray(img.affine, dtype=np.float64)
    linear = affine[:3, :3]
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(linear)) < 1e-9:
        return False
    return not (np.allclose(np.abs(linear), np.eye(3)) and np.allclose(affine[:3, 3], 0))


def _volume_axes(study: Study) -> tuple[np.ndarray, np.ndarray]:
    """Unit LPS directions of the volume's (z, y, x) index axes and the superior slice normal."""
    o = np.asarray(study.orientation, dtype=np.float64)
    normal = superior_normal(o)
    return np.stack([-normal, o[3:] / np.linalg.norm(o[3:]), o[:3] / np.linalg.norm(o[:3])]), normal


def _axis_map(lps: np.ndarray, dirs: np.ndarray) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """For each volume axis (z, y, x): the NIfTI axis along it and whether it runs backwards."""
    axes, flips = [-1, -1, -1], [False] * 3
    for a in range(3):
        col = lps[:3, a]
        step = float(np.linalg.norm(col))
        cos = dirs @ (col / step)
        b = int(np.argmax(np.abs(cos)))
        if abs(cos[b]) < AXIS_COS_MIN or axes[b] != -1:
            direction = np.round(col / step, 3).tolist()
            raise _Mismatch(f"NIfTI axis {a} (LPS direction {direction}) matches no volume axis")
        axes[b], flips[b] = a, bool(cos[b] < 0)
    return tuple(axes), tuple(flips)


def _check_grid(
    lps: np.ndarray,
    axes: tuple[int, ...],
    flips: tuple[bool, ...],
    shape: tuple[int, ...],
    study: Study,
    normal: np.ndarray,
) -> None:
    """Spacing, corner voxel and slice positions of the reoriented NIfTI against the study."""
    spacing = np.asarray(study.spacing, dtype=np.float64)
    steps = np.array([np.linalg.norm(lps[:3, axes[b]]) for b in range(3)])
    if study.shape[0] < 2:
        steps[0] = spacing[0]  # a single slice has no measured spacing
    if np.any(np.abs(steps - spacing) > SPACING_RTOL * spacing):
        raise _Mismatch(f"voxel size {np.round(steps, 4).tolist()} mm vs study spacing {spacing.tolist()} mm")
    index = np.zeros(4)
    index[3] = 1.0
    for b in range(3):
        index[axes[b]] = shape[axes[b]] - 1 if flips[b] else 0
    step0 = lps[:3, axes[0]] * (-1.0 if flips[0] else 1.0)
    corner = (lps @ index)[:3]
    dirs, _ = _volume_axes(study)
    off = (corner - np.asarray(study.positions[0], dtype=np.float64)) @ dirs.T
    if np.any(np.abs(off) > spacing + 1e-3):
        off_mm = np.round(off, 2).tolist()
        raise _Mismatch(f"first voxel is {off_mm} mm (z, y, x) off the study's first voxel")
    z_nii = (corner + np.outer(np.arange(shape[axes[0]]), step0)) @ normal
    dz_err = np.abs(z_nii - np.asarray(study.z_positions, dtype=np.float64))
    if dz_err.max() > 0.5 * spacing[0] + 1e-3:
        worst = int(np.argmax(dz_err))
        raise _Mismatch(f"slice {worst} lies {dz_err[worst]:.2f} mm from the study's slice position")


def _geometry(img, labels: np.ndarray, study: Study, path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """Labels reoriented to the volume by the affine, and the axis map; raises _Mismatch."""
    lps = RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)
    dirs, normal = _volume_axes(study)
    axes, flips = _axis_map(lps, dirs)
    shape = tuple(labels.shape[a] for a in axes)
    if shape != study.shape:
        raise SegmentationError(
            f"{_where(path, study)}: NIfTI shape {labels.shape} reoriented by its affine is {shape}, "
            f"study volume is {study.shape}"
        )
    _check_grid(lps, axes, flips, labels.shape, study, normal)
    out = labels.transpose(axes)
    for b in range(3):
        if flips[b]:
            out = np.flip(out, axis=b)
    return out, axes


def _recipe(labels: np.ndarray, study: Study, path: Path) -> np.ndarray:
    """The RSNA array recipe, then file-number order → superior-first order from the instance numbers."""
    z, h, w = study.shape
    if labels.shape != (w, h, z):
        raise SegmentationError(
            f"{_where(path, study)}: NIfTI shape {labels.shape} does not fit study volume {study.shape} "
            f"(the RSNA layout is (W, H, Z) = {(w, h, z)})"
        )
    by_file_number = labels[:, ::-1, ::-1].transpose(2, 1, 0)
    rank = np.argsort(np.argsort(np.asarray(study.instance_numbers), kind="stable"), kind="stable")
    if np.array_equal(rank, np.arange(z)):
        return by_file_number
    if np.array_equal(rank, np.arange(z)[::-1]):
        return by_file_number[::-1]
    return by_file_number[rank]


def load_segmentation(nii_path: str | os.PathLike, study: Study, *, method: str = "auto") -> np.ndarray:
    """The segmentation as uint8 (Z, H, W) aligned with ``study.volume`` (index 0 the most superior).

    Args:
        nii_path: the NIfTI file (``segmentations/<uid>.nii``).
        study: the study it belongs to, from :func:`cervspine.io.load_study`.
        method: "geometry" (affine vs DICOM geometry, checked), "recipe" (RSNA array recipe + instance
            number order) or "auto": geometry when the affine is informative — and then the recipe must
            agree whenever the file is in the RSNA layout — else the recipe with a warning.

    Raises:
        SegmentationError (naming the NIfTI and the study folder): unreadable file, non-integer labels
        or labels above 19, a shape that does not fit the study, an affine that contradicts the study,
        or geometry and recipe disagreeing.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    path = Path(nii_path)
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise SegmentationError(f"{_where(path, study)}: cannot read the NIfTI ({exc})") from exc
    labels = _labels(img, path, study)
    if method == "recipe":
        return np.ascontiguousarray(_recipe(labels, study, path))
    if not _informative(img):
        if method == "geometry":
            raise SegmentationError(f"{_where(path, study)}: the NIfTI affine carries no geometry")
        warnings.warn(
            f"{path}: NIfTI affine is uninformative (no sform/qform code, singular or identity); "
            "aligned with the RSNA array recipe instead",
            UserWarning,
            stacklevel=2,
        )
        return np.ascontiguousarray(_recipe(labels, study, path))
    try:
        aligned, axes = _geometry(img, labels, study, path)
    except _Mismatch as exc:
        where = _where(path, study)
        raise SegmentationError(f"{where}: the NIfTI affine contradicts the study: {exc}") from exc
    if method == "auto" and axes == RSNA_AXES and not np.array_equal(aligned, _recipe(labels, study, path)):
        raise SegmentationError(
            f"{_where(path, study)}: the affine and the RSNA array recipe disagree on the alignment "
            "(check the file's orientation or pass method='geometry' / 'recipe')"
        )
    return np.ascontiguousarray(aligned)
