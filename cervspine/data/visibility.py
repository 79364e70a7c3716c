"""Per-slice vertebra visibility from stage 1, made robust to an under-confident detector."""

from __future__ import annotations

import numpy as np

MODES = ("none", "per_study_max")


def normalize_visibility(vis: np.ndarray, mode: str = "none", floor: float = 0.05) -> np.ndarray:
    """(Z, 7) probabilities → visibility used by stage 2 and the aggregation.

    ``per_study_max`` divides each level by its highest probability in the study (levels whose peak is
    below ``floor`` are left as they are), so a level the detector found but scored below 0.5 still
    gets its best slices; every cervical CT shows all seven levels unless the scan cuts them off.
    """
    if mode not in MODES:
        raise ValueError(f"visibility normalization must be one of {MODES}, got {mode!r}")
    vis = np.asarray(vis, dtype=np.float32)
    if mode == "none":
        return vis
    peak = vis.max(axis=0, keepdims=True)
    return np.where(peak >= floor, vis / np.maximum(peak, 1e-6), vis).astype(np.float32)
