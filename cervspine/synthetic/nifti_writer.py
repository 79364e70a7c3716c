"""Writing a synthetic study's vertebra labels as a NIfTI segmentation, as the RSNA files store them.

The array is in the RSNA orientation (W, H, Z) with its RAS affine; ``noisy_labels`` optionally warps
the boundaries like a model-made mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cervspine.synthetic.phantom import SyntheticStudy


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
