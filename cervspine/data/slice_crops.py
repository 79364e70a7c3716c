"""Which slices the slice classifier scores and how their spine crops are cut: one definition for its
DataModule and for inference (which reads it back from the checkpoint's data hyper-parameters)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cervspine.data.spine import crop_track
from cervspine.data.visibility import normalize_visibility


@dataclass(frozen=True)
class SliceCropSpec:
    """``visible_threshold``: a slice is scored when a level's (normalised) visibility reaches it;
    ``crop_margin``/``min_crop``: the spine crop track (:func:`~cervspine.data.spine.crop_track`);
    ``visibility_norm``: how stage-1 visibility is normalised first (:mod:`cervspine.data.visibility`)."""

    visible_threshold: float = 0.5
    crop_margin: float = 0.25
    min_crop: float = 0.15
    visibility_norm: str = "none"

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> SliceCropSpec:
        d = cls()
        return cls(
            float(hp.get("visible_threshold", d.visible_threshold)),
            float(hp.get("crop_margin", d.crop_margin)),
            float(hp.get("min_crop", d.min_crop)),
            str(hp.get("visibility_norm", d.visibility_norm)),
        )

    def visibility(self, vis: np.ndarray) -> np.ndarray:
        return normalize_visibility(vis, self.visibility_norm)

    def scored_slices(self, vis: np.ndarray) -> np.ndarray:
        """Indices of the slices that show a level (``vis`` already normalised)."""
        return np.flatnonzero(vis.max(axis=1) >= self.visible_threshold)

    def crops(self, boxes: np.ndarray) -> np.ndarray:
        """(Z, 4) square crop boxes following the spine boxes."""
        return crop_track(boxes, margin=self.crop_margin, min_size=self.min_crop)
