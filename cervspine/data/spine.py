"""In-plane localisation of the cervical spine: per-slice boxes → a smooth per-slice crop track."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import median_filter


def crop_track(
    boxes: np.ndarray, *, margin: float = 0.25, min_size: float = 0.15, smooth: int = 9
) -> np.ndarray:
    """(Z, 4) normalised (y0, x0, y1, x1) boxes with NaN rows → (Z, 4) square crop boxes for every slice.

    The crop centre follows the spine (median-smoothed over ``smooth`` slices, held constant beyond the
    first/last box); the side is the largest box side of the study times ``1 + 2·margin``, at least
    ``min_size``. A study without any box gets a centred crop of side ``max(min_size, 0.5)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    z = boxes.shape[0]
    valid = ~np.isnan(boxes).any(axis=1)
    if not valid.any():
        side = max(min_size, 0.5)
        return np.tile([0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2], (z, 1)).astype(
            np.float32
        )
    cy = (boxes[:, 0] + boxes[:, 2]) / 2
    cx = (boxes[:, 1] + boxes[:, 3]) / 2
    idx = np.flatnonzero(valid)
    cy = np.interp(np.arange(z), idx, cy[idx])
    cx = np.interp(np.arange(z), idx, cx[idx])
    if smooth > 1:
        cy = median_filter(cy, size=smooth, mode="nearest")
        cx = median_filter(cx, size=smooth, mode="nearest")
    sides = np.maximum(boxes[valid, 2] - boxes[valid, 0], boxes[valid, 3] - boxes[valid, 1])
    side = max(float(np.quantile(sides, 0.9)) * (1 + 2 * margin), min_size)
    side = min(side, 1.0)
    half = side / 2
    cy = np.clip(cy, half, 1 - half)
    cx = np.clip(cx, half, 1 - half)
    return np.stack([cy - half, cx - half, cy + half, cx + half], axis=1).astype(np.float32)


def crop_pixels(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Normalised box → integer (y0, x0, y1, x1) pixel bounds inside the image, at least 1 px."""
    y0 = int(np.clip(np.floor(box[0] * height), 0, height - 1))
    x0 = int(np.clip(np.floor(box[1] * width), 0, width - 1))
    y1 = int(np.clip(np.ceil(box[2] * height), y0 + 1, height))
    x1 = int(np.clip(np.ceil(box[3] * width), x0 + 1, width))
    return y0, x0, y1, x1
