from cervspine.inference.predictor import *  # noqa: F403
from cervspine.inference.predictor import (  # noqa: F401
    EnsemblePredictor,
    Predictor,
    StudyPrediction,
    load_predictor,
    stage1_frame,
    torch_threads,
)
