"""The per-vertebra sequence model as a stage-2 strategy: C1–C7 crop sequences placed by stage 1 (never by
a segmentation: test studies have none), scored as one study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cervspine import VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.data.vertebra_crops import VertebraCropper, VertebraExtent, study_sequences
from cervspine.inference.checkpoints import TrainedStage, load_module
from cervspine.inference.runtime import Runtime
from cervspine.inference.stage1 import Stage1Output
from cervspine.inference.stage2 import Stage2Result, register_stage2
from cervspine.models.sequence import VertebraSequenceClassifier
from cervspine.scoring.answer import prior_result, sequence_result


@dataclass
class SequenceInputs:
    """A study's 7 sequences: images (7, N, C, S, S), sampled slices (7, N; -1 absent), presence (7,)."""

    uid: str
    extents: list[VertebraExtent]
    images: np.ndarray
    slices: np.ndarray
    present: np.ndarray


@register_stage2("VertebraSequenceClassifier")
class SequenceStage2(TrainedStage):
    """:class:`~cervspine.models.sequence.VertebraSequenceClassifier` on stage-1-placed crop sequences."""

    kind = "sequence"
    calibrated = False  # no study calibration: the model's prior and logit shift are in its buffers

    def __init__(
        self, model: VertebraSequenceClassifier, data_hp: dict[str, Any], runtime: Runtime, checkpoint: Path
    ):
        super().__init__(model, data_hp, runtime, checkpoint)
        self.cropper = VertebraCropper.from_hparams(data_hp)

    @property
    def prior(self) -> np.ndarray:
        """(8,) the model's training prior (what a study gets that cannot be scored)."""
        return np.asarray(self.model.training_prior(), dtype=np.float64)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, runtime: Runtime, *, ckpt: dict[str, Any] | None = None, **_: Any
    ) -> SequenceStage2:
        """``aggregation`` and other slice-model options do not apply and are ignored."""
        model, data_hp = load_module(path, VertebraSequenceClassifier, runtime, ckpt)
        return cls(model, data_hp, runtime, Path(path))

    def inputs(self, study: CachedStudy, stage1: Stage1Output) -> SequenceInputs:
        vis, boxes = stage1.visibility, stage1.boxes
        extents = self.cropper.extents_from_stage1(vis, boxes)
        images, slices, present = study_sequences(self.cropper, study.volume, extents, vis, boxes)
        return SequenceInputs(study.uid, extents, images, slices, present)

    def score(self, inputs: SequenceInputs) -> Stage2Result:
        """``fracture_slices``: the sampled slices (sorted, unique); ``fracture_probs[i, v]``: vertebra v's
        probability where slice i was sampled for v, else 0. Absent vertebrae get the training prior (the
        model's own rule), every target does when stage 1 found none."""
        if not inputs.present.any():
            missing = [v for v, ok in zip(VERTEBRAE, inputs.present) if not ok]
            return prior_result(self.model.training_prior(), missing)
        x = torch.from_numpy(inputs.images).to(self.runtime.device)
        with self.runtime.autocast():
            probs = self.model.predict_study(x, torch.from_numpy(inputs.present).to(self.runtime.device))
        return sequence_result(probs, inputs.slices, [e.as_dict() for e in inputs.extents], inputs.present)

    def explain(
        self, study: CachedStudy, stage1: Stage1Output, slices: np.ndarray, levels: list[int]
    ) -> None:
        """No saliency for the sequence model (its Grad-CAM would need a target per sequence position)."""
        return None
