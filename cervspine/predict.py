"""``python -m cervspine.predict``: a Kaggle submission.csv for ``data.root``'s test.csv, or, with
``study=DIR``, one study's answer (``dicom_out=OUT``: also as DICOM SR, SEG and key images); the models of
``run_dir``/``ckpt.*``, or of a bundle (``bundle=B backend=onnxruntime|openvino|torch``); see
:mod:`cervspine.jobs.predict`. The submission always has every row: a test study that cannot be scored
is answered with the training prior and listed in failures.csv (``strict=true``: exits non-zero instead,
listing the studies)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import cervspine.config  # noqa: F401  (registers resolvers)
from cervspine.jobs.folder import FolderFailures, print_folder_result
from cervspine.jobs.predict import (
    dicom_dir,
    make_predictor,
    predict_folder,
    predict_study_folder,
    report_dir,
    thresholds_for,
)
from cervspine.scoring.levels import level_answers

__all__ = ["main", "predict_folder", "predict_study_folder"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predictor = make_predictor(cfg)
    if cfg.get("study"):
        pred = predict_study_folder(cfg, predictor)
        thresholds = thresholds_for(cfg)
        for answer in level_answers(pred.probabilities, thresholds, pred.not_localised):
            print(f"  {answer.sentence()}")
        print(
            f"operating point: p > {thresholds.vertebra:.3f} (C1-C7), > {thresholds.patient:.3f} (patient); "
            f"{thresholds.rule}"
            if thresholds is not None
            else "no operating point (run evaluate to write <run_dir>/operating_point.json, or give one)"
        )
        if cfg.get("report") or cfg.get("dicom_out"):
            print(f"report: {report_dir(cfg, pred.uid) / 'report.html'}")
        if cfg.get("dicom_out"):
            print(f"DICOM results ({', '.join(cfg.dicom_objects)}): {dicom_dir(cfg, pred.uid)}")
        return
    try:
        result = predict_folder(cfg, predictor)
    except FolderFailures as e:  # strict=true
        print(e, file=sys.stderr)
        sys.exit(1)
    print_folder_result(result)


if __name__ == "__main__":
    main()
