"""Scoring studies with trained models: :class:`Stage1`, the stage-2 strategies (:mod:`.stage2`: the slice
classifier and the sequence model, chosen by the checkpoint), and :class:`Predictor` (stage 1 + one or more
stage-2 models; several are an ensemble). :func:`load_predictor` is the config's ``_target_``."""

from cervspine.inference import sequence_stage2, slice_stage2  # noqa: F401  (register the strategies)
from cervspine.inference.predictor import Predictor, StudyPrediction, load_predictor
from cervspine.inference.runtime import Runtime, pick_device, torch_threads
from cervspine.inference.stage1 import Stage1, Stage1Output
from cervspine.inference.stage2 import STAGE2, Explanation, Stage2, Stage2Result, load_stage2, register_stage2

__all__ = [
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
    "load_stage2",
    "pick_device",
    "register_stage2",
    "torch_threads",
]
