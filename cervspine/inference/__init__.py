"""Scoring studies with trained models: the stage-1 strategies (:mod:`.stage1`: the per-slice detector and
the whole-column model), the stage-2 strategies (:mod:`.stage2`: the slice classifier and the sequence
model) — each chosen by the model class its checkpoint records — and :class:`Predictor` (stage 1 + one or
more stage-2 models; several are an ensemble). :func:`load_predictor` is the config's ``_target_``."""

from cervspine.inference import (  # noqa: F401  (register the strategies)
    column_stage1,
    sequence_stage2,
    slice_stage1,
    slice_stage2,
)
from cervspine.inference.predictor import Predictor, StudyPrediction, load_predictor
from cervspine.inference.runtime import Runtime, pick_device, torch_threads
from cervspine.inference.stage1 import STAGE1, Stage1, Stage1Output, load_stage1, register_stage1
from cervspine.inference.stage2 import STAGE2, Explanation, Stage2, Stage2Result, load_stage2, register_stage2

__all__ = [
    "STAGE1",
    "STAGE2",
    "Explanation",
    "Predictor",
    "Runtime",
    "Stage1",
    "Stage1Output",
    "Stage2",
    "Stage2Result",
    "StudyPrediction",
    "load_predictor",
    "load_stage1",
    "load_stage2",
    "pick_device",
    "register_stage1",
    "register_stage2",
    "torch_threads",
]
