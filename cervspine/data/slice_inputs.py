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
from cervspine.data.windows import StackSpec, parallel_map, windowed_resized

HuReader = Callable[[np.ndarray], np.ndarray]
"""slice indices → (K, H, W) HU slices."""


@dataclass
class SliceInputs:
    """A study's slice-classifier inputs: the scored ``slices``, the normalised visibility the
    aggregation weighs them by, and what :func:`slice_batch` cuts the crops from."""

    study: CachedStudy
    visibility: np.ndarray  # (Z, 7), normalised as in training
    crops: np.ndarray  # (Z, 4) crop boxes
    slices: np.ndarray  # (n,) scored slice indices
    read: HuReader


def slice_inputs(
    study: CachedStudy, stage1: Stage1Output, spec: SliceCropSpec, stack: StackSpec
) -> SliceInputs:
    """Every slice that shows a level (each crop windowed where :func:`slice_batch` cuts it: nothing of
    the volume is windowed beyond the crops)."""
    vis = spec.visibility(stage1.visibility)
    volume = study.volume
    return SliceInputs(study, vis, spec.crops(stage1.boxes), spec.scored_slices(vis), volume.__getitem__)


def explained_inputs(
    study: CachedStudy, stage1: Stage1Output, spec: SliceCropSpec, stack: StackSpec, slices: np.ndarray
) -> SliceInputs:
    """The inputs of a few chosen ``slices`` only: for saliency maps."""
    vis = spec.visibility(stage1.visibility)
    return SliceInputs(study, vis, spec.crops(stage1.boxes), np.asarray(slices, dtype=int), study.slices)


def slice_batch(
    inputs: SliceInputs, zs: np.ndarray, stack: StackSpec, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Images (b, C, S, S) float32, metadata (b, M) float32 and pixel crops (y0, x0, y1, x1) of the slices
    ``zs``: each slice's 2.5D stack cut along its crop box, windowed, resized to ``stack.input_size``;
    the slices side by side on ``threads`` threads (None: the usable cores)."""
    study, size, windows = inputs.study, stack.input_size, stack.hu_windows
    sf = study_features(study.meta)
    h, w = study.volume.shape[1:]
    pix = [crop_pixels(inputs.crops[z], h, w) for z in zs]

    def image(i: int) -> np.ndarray:
        y0, x0, y1, x1 = pix[i]
        idx = np.clip(zs[i] + stack.offsets, 0, study.num_slices - 1)
        hu = np.asarray(inputs.read(idx))[:, y0:y1, x0:x1]  # (K, h', w')
        win = windowed_resized(hu, windows, size)  # (K, nW, S, S)
        return win.transpose(1, 0, 2, 3).reshape(-1, size, size)  # window-major channels

    imgs = parallel_map(image, range(len(zs)), threads)
    metas = [np.concatenate([slice_features(int(z), study.num_slices, inputs.visibility[z]), sf]) for z in zs]
    return np.stack(imgs), np.stack(metas).astype(np.float32), pix
