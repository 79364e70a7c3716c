"""The slice classifier as a stage-2 strategy: spine crops of every slice that shows a level, scored one
batch at a time, aggregated to the study and calibrated as the checkpoint was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cervspine import VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.data.slice_crops import SliceCropSpec
from cervspine.data.slice_inputs import (  # noqa: F401  (SliceInputs, HuReader: re-exported)
    HuReader,
    SliceInputs,
    explained_inputs,
    slice_batch,
    slice_inputs,
)
from cervspine.data.windows import StackSpec
from cervspine.inference.checkpoints import TrainedStage, load_module
from cervspine.inference.runtime import Runtime
from cervspine.inference.saliency import gradcam
from cervspine.inference.stage1 import Stage1Output
from cervspine.inference.stage2 import Explanation, Stage2Result, register_stage2
from cervspine.models.fracture import FractureClassifier
from cervspine.scoring.answer import localised_levels, prior_result, slice_study


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

    @property
    def prior(self) -> np.ndarray:
        """(8,) the model's training prior (what a study gets that cannot be scored)."""
        return np.asarray(self.model.training_prior(), dtype=np.float64)

    # ---- inputs --------------------------------------------------------------------------------------
    def inputs(self, study: CachedStudy, stage1: Stage1Output) -> SliceInputs:
        return slice_inputs(study, stage1, self.spec, self.stack)

    def batches(self, inputs: SliceInputs) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, list]]:
        """(slice indices, images (b, C, S, S), metadata (b, M), pixel crops) per batch of scored slices."""
        bs = self.runtime.batch_size
        for start in range(0, len(inputs.slices), bs):
            zs = inputs.slices[start : start + bs]
            yield (zs, *self._tensors(inputs, zs))

    def _tensors(self, inputs: SliceInputs, zs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, list]:
        imgs, metas, pix = slice_batch(inputs, zs, self.stack)
        dev = self.runtime.device
        return torch.from_numpy(imgs).to(dev), torch.from_numpy(metas).to(dev), pix

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
        localised, missing = localised_levels(inputs.visibility, z, self.spec.visible_threshold)
        if not localised.any():  # stage 1 found nothing: the prior, flagged
            return prior_result(prior, missing)
        probs = self.slice_probabilities(inputs)
        calibrate = self.model.calibrate if self._calibrated else None
        final, agg_s = slice_study(probs, inputs.visibility, z, localised, prior, self.aggregation, calibrate)
        return Stage2Result(final, z, probs, aggregate_s=agg_s, not_localised=missing)

    # ---- reports -------------------------------------------------------------------------------------
    def explain(
        self, study: CachedStudy, stage1: Stage1Output, slices: np.ndarray, levels: list[int]
    ) -> Explanation:
        """Grad-CAM of ``levels[i]``'s logit on slice ``slices[i]``, from inputs built as :meth:`score`'s
        (only the slices asked for are windowed)."""
        inputs = explained_inputs(study, stage1, self.spec, self.stack, slices)
        x, m, crops = self._tensors(inputs, inputs.slices)
        cams, layer = gradcam(self.model, x.float(), m, list(levels))
        middle = len(self.stack.offsets) // 2  # channels are window-major: window 0's middle slice
        return Explanation(x.float().cpu().numpy(), cams, layer, crops, middle)
