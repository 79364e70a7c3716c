"""The slice classifier as a stage-2 strategy: spine crops of every slice that shows a level, scored one
batch at a time, aggregated to the study and calibrated as the checkpoint was."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cervspine import VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.data.metadata import slice_features, study_features
from cervspine.data.slice_crops import SliceCropSpec
from cervspine.data.spine import crop_pixels
from cervspine.data.transforms import StackSpec, apply_windows, resize_hwc
from cervspine.inference.checkpoints import TrainedStage, load_module
from cervspine.inference.runtime import Runtime
from cervspine.inference.saliency import gradcam
from cervspine.inference.stage1 import Stage1Output
from cervspine.inference.stage2 import Explanation, Stage2Result, register_stage2
from cervspine.models.fracture import FractureClassifier
from cervspine.scoring.aggregation import aggregate_slices, fill_unlocalised

Windowed = Callable[[np.ndarray], np.ndarray]
"""slice indices → (K, nW, H, W) windowed slices."""


@dataclass
class SliceInputs:
    """A study's slice-classifier inputs: the scored ``slices``, the normalised visibility the
    aggregation weighs them by, and what :meth:`SliceStage2.batches` cuts the crops from."""

    study: CachedStudy
    visibility: np.ndarray  # (Z, 7), normalised as in training
    crops: np.ndarray  # (Z, 4) crop boxes
    slices: np.ndarray  # (n,) scored slice indices
    windowed: Windowed


@register_stage2("FractureClassifier")
class SliceStage2(TrainedStage):
    """:class:`~cervspine.models.fracture.FractureClassifier` per slice → aggregation → calibration."""

    kind = "slice"

    def __init__(
        self,
        model: FractureClassifier,
        data_hp: dict[str, Any],
        runtime: Runtime,
        checkpoint: Path,
        aggregation: dict[str, Any] | None = None,
    ):
        super().__init__(model, data_hp, runtime, checkpoint)
        self.stack = StackSpec.from_hparams(data_hp)
        self.spec = SliceCropSpec.from_hparams(data_hp)
        trained = dict(model.aggregation or {})
        self.aggregation = dict(aggregation or trained)
        # the checkpoint's calibration was fitted on its own aggregation's outputs
        self._calibrated = self.aggregation == trained

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        runtime: Runtime,
        *,
        ckpt: dict[str, Any] | None = None,
        aggregation: dict[str, Any] | None = None,
    ) -> SliceStage2:
        model, data_hp = load_module(path, FractureClassifier, runtime, ckpt)
        return cls(model, data_hp, runtime, Path(path), aggregation)

    @property
    def calibrated(self) -> bool:
        return self._calibrated

    # ---- inputs --------------------------------------------------------------------------------------
    def inputs(self, study: CachedStudy, stage1: Stage1Output) -> SliceInputs:
        vis = self.spec.visibility(stage1.visibility)
        win = apply_windows(study.volume, self.stack.hu_windows, axis=1)  # (Z, nW, H, W), once per study
        return SliceInputs(
            study, vis, self.spec.crops(stage1.boxes), self.spec.scored_slices(vis), win.__getitem__
        )

    def batches(self, inputs: SliceInputs) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, list]]:
        """(slice indices, images (b, C, S, S), metadata (b, M), pixel crops) per batch of scored slices."""
        bs = self.runtime.batch_size
        for start in range(0, len(inputs.slices), bs):
            zs = inputs.slices[start : start + bs]
            yield (zs, *self._tensors(inputs, zs))

    def _tensors(self, inputs: SliceInputs, zs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list]:
        study, size = inputs.study, self.stack.input_size
        sf = study_features(study.meta)
        h, w = study.volume.shape[1:]
        imgs, metas, pix = [], [], []
        for z in zs:
            y0, x0, y1, x1 = crop_pixels(inputs.crops[z], h, w)
            idx = np.clip(z + self.stack.offsets, 0, study.num_slices - 1)
            patch = inputs.windowed(idx)[:, :, y0:y1, x0:x1]  # (K, nW, h', w')
            hwc = patch.transpose(1, 0, 2, 3).reshape(-1, y1 - y0, x1 - x0).transpose(1, 2, 0)
            imgs.append(resize_hwc(np.ascontiguousarray(hwc), size).transpose(2, 0, 1))
            metas.append(np.concatenate([slice_features(int(z), study.num_slices, inputs.visibility[z]), sf]))
            pix.append((y0, x0, y1, x1))
        x = torch.from_numpy(np.stack(imgs)).to(self.runtime.device)
        m = torch.from_numpy(np.stack(metas).astype(np.float32)).to(self.runtime.device)
        return x, m, pix

    # ---- scoring -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def slice_probabilities(self, inputs: SliceInputs) -> np.ndarray:
        """(n, 7) per-slice fracture probabilities of the scored slices."""
        probs = [np.zeros((0, len(VERTEBRAE)), dtype=np.float32)]
        for _, x, m, _ in self.batches(inputs):
            with self.runtime.autocast():
                out = self.model(x, m)
            probs.append(torch.sigmoid(out["fracture"].float()).cpu().numpy())
        return np.concatenate(probs)

    def score(self, inputs: SliceInputs) -> Stage2Result:
        """Aggregated, calibrated study probabilities; a level no scored slice shows gets the training
        prior (:func:`~cervspine.scoring.aggregation.fill_unlocalised`), all of them when none does."""
        z = inputs.slices
        prior = self.model.training_prior()
        localised = np.zeros(len(VERTEBRAE), dtype=bool)
        if len(z):
            localised = inputs.visibility[z].max(axis=0) >= self.spec.visible_threshold
        missing = [v for v, ok in zip(VERTEBRAE, localised) if not ok]
        if not localised.any():  # stage 1 found nothing: the prior, flagged
            empty = np.zeros((0, len(VERTEBRAE)), dtype=np.float32)
            return Stage2Result(prior.astype(np.float32), z[:0], empty, not_localised=missing)
        probs = self.slice_probabilities(inputs)
        t0 = time.perf_counter()
        agg, _ = aggregate_slices(probs, inputs.visibility[z], np.zeros(len(z)), z, **self.aggregation)
        final = self.model.calibrate(agg)[0] if self._calibrated else agg[0]
        final = fill_unlocalised(final, localised, prior)
        return Stage2Result(final, z, probs, aggregate_s=time.perf_counter() - t0, not_localised=missing)

    # ---- reports -------------------------------------------------------------------------------------
    def explain(
        self, study: CachedStudy, stage1: Stage1Output, slices: np.ndarray, levels: list[int]
    ) -> Explanation:
        """Grad-CAM of ``levels[i]``'s logit on slice ``slices[i]``, from inputs built as :meth:`score`'s
        (only the slices asked for are windowed)."""
        vis = self.spec.visibility(stage1.visibility)

        def windowed(idx: np.ndarray) -> np.ndarray:
            return apply_windows(study.slices(idx), self.stack.hu_windows, axis=1)

        inputs = SliceInputs(
            study, vis, self.spec.crops(stage1.boxes), np.asarray(slices, dtype=int), windowed
        )
        x, m, crops = self._tensors(inputs, inputs.slices)
        cams, layer = gradcam(self.model, x.float(), m, list(levels))
        middle = len(self.stack.offsets) // 2  # channels are window-major: window 0's middle slice
        return Explanation(x.float().cpu().numpy(), cams, layer, crops, middle)
