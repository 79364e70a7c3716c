"""Model bundles: one versioned folder to deploy a trained run without the training code.

``python -m cervspine.export run_dir=R out=B`` writes ONNX graphs of every stage, a manifest (input
settings, calibration, operating point, ensemble, versions, checksums; :mod:`.manifest`) and the model
card (:mod:`.export`, the only part that needs torch). Scoring from a bundle imports neither torch, nor
Lightning, nor Hydra: :class:`BundlePredictor`, :func:`predict_study`, :func:`predict_folder`
(:mod:`.predictor`), on ONNX Runtime or OpenVINO (:mod:`.backends`), from the command line with
``python -m cervspine.bundle.run`` or through ``python -m cervspine.predict bundle=B backend=...``.
"""

from cervspine.bundle.manifest import VERSION, BundleError, read_manifest
from cervspine.bundle.predictor import BundlePredictor, FolderResult, predict_folder, predict_study

__all__ = [
    "VERSION",
    "BundleError",
    "BundlePredictor",
    "FolderResult",
    "predict_folder",
    "predict_study",
    "read_manifest",
]
