"""The slice classifier's inputs for one study at inference, in numpy: which slices are scored, their
spine crops as 2.5D stacks and their metadata vectors. One copy for the torch strategy
(:class:`~cervspine.inference.slice_stage2.SliceStage2`) and a model bundle's runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cervspine.cache.study import CachedStudy
from cervspine.data.metadata import slice_features, study_features
from cervspine.data.slice_crops import SliceCropSpec
from cervspine.data.spine import crop_pixels
from cervspine.data.stage1_table import Stage1Output
from cervspine.data.windows import StackSpec, apply_windows, resize_hwc

Windowed = Callable[[np.ndarray], np.ndarray]
"""slice indices → (K, nW, H, W) windowed slices."""


@dataclass
class SliceInputs:
    """A study's slice-classifier inputs: the scored ``slices``, the normalised visibility the
    aggregation weighs them by, and what :func:`slice_batch` cuts the crops from."""

    study: CachedStudy
    visibility: np.ndarray  # (Z, 7), normalised as in training
    crops: np.ndarray  # (Z, 4) crop boxes
    slices: np.ndarray  # (n,) scored slice indices
    windowed: Windowed


def slice_inputs(
    study: CachedStudy, stage1: Stage1Output, spec: SliceCropSpec, stack: StackSpec
) -> SliceInputs:
    """Every slice that shows a level, the volume windowed once for the study."""
    vis = spec.visibility(stage1.visibility)
    win = apply_windows(study.volume, stack.hu_windows, axis=1)  # (Z, nW, H, W), once per study
    return SliceInputs(study, vis, spec.crops(stage1.boxes), spec.scored_slices(vis), win.__getitem__)


def explained_inputs(
    study: CachedStudy, stage1: Stage1Output, spec: SliceCropSpec, stack: StackSpec, slices: np.ndarray
) -> SliceInputs:
    """The inputs of a few chosen ``slices`` only (only their stacks are windowed): for saliency maps."""

    def windowed(idx: np.ndarray) -> np.ndarray:
        return apply_windows(study.slices(idx), stack.hu_windows, axis=1)

    vis = spec.visibility(stage1.visibility)
    return SliceInputs(study, vis, spec.crops(stage1.boxes), np.asarray(slices, dtype=int), windowed)


def slice_batch(
    inputs: SliceInputs, zs: np.ndarray, stack: StackSpec
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Images (b, C, S, S) float32, metadata (b, M) float32 and pixel crops (y0, x0, y1, x1) of the slices
    ``zs``: each slice's 2.5D stack cut along its crop box, resized to ``stack.input_size``."""
    study, size = inputs.study, stack.input_size
    sf = study_features(study.meta)
    h, w = study.volume.shape[1:]
    imgs, metas, pix = [], [], []
    for z in zs:
        y0, x0, y1, x1 = crop_pixels(inputs.crops[z], h, w)
        idx = np.clip(z + stack.offsets, 0, study.num_slices - 1)
        patch = inputs.windowed(idx)[:, :, y0:y1, x0:x1]  # (K, nW, h', w')
        hwc = patch.transpose(1, 0, 2, 3).reshape(-1, y1 - y0, x1 - x0).transpose(1, 2, 0)
        imgs.append(resize_hwc(np.ascontiguousarray(hwc), size).transpose(2, 0, 1))
        metas.append(np.concatenate([slice_features(int(z), study.num_slices, inputs.visibility[z]), sf]))
        pix.append((y0, x0, y1, x1))
    return np.stack(imgs), np.stack(metas).astype(np.float32), pix
