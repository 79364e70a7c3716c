"""``python -m cervspine.predict``: a Kaggle submission.csv for a folder's test.csv, or one study's answer.

Every scored study also gets ``studies/<uid>.json`` (per-vertebra probabilities, the detected vertebra
extents, timings). The submission is written atomically and only when every study was scored; otherwise
the command exits non-zero listing the studies it could not score. ``report=true`` adds
``study_reports/<uid>/report.html`` (+ PNGs) per study (see :mod:`cervspine.report.study`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

import cervspine.config  # noqa: F401
from cervspine import TARGETS
from cervspine.cache import CachedStudy, CacheParams, InMemoryStudy, preprocess
from cervspine.data.stage1_table import vertebra_extents
from cervspine.inference import EnsemblePredictor, Predictor, StudyPrediction, load_predictor
from cervspine.io import load_study
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.io.rsna import RsnaIndex
from cervspine.runs.layout import is_synthetic, stage_checkpoints, use_trained_image_size

log = logging.getLogger(__name__)
EPS = 1e-4


@dataclass
class PredictResult:
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    submission: Path | None = None
    reports: dict[str, Path] = field(default_factory=dict)


def study_record(pred: StudyPrediction) -> dict[str, Any]:
    extents = vertebra_extents(pred.slice_table).drop(columns="StudyInstanceUID")
    return {**pred.as_dict(), "vertebra_extents": extents.to_dict(orient="records")}


def submission_frame(test: pd.DataFrame, predictions: dict[str, np.ndarray]) -> pd.DataFrame:
    """test.csv rows → (row_id, fractured), probabilities strictly inside (0, 1)."""
    col = {t: i for i, t in enumerate(TARGETS)}
    values = [
        float(predictions[u][col[t]]) for u, t in zip(test["StudyInstanceUID"], test["prediction_type"])
    ]
    return pd.DataFrame({"row_id": test["row_id"].to_numpy(), "fractured": np.clip(values, EPS, 1 - EPS)})


def _predictor(cfg: DictConfig) -> Predictor | EnsemblePredictor:
    s1, s2 = stage_checkpoints(cfg.get("run_dir"), cfg.ckpt.stage1, cfg.ckpt.stage2)
    return load_predictor(
        s1,
        s2,
        device=cfg.device,
        batch_size=cfg.batch_size,
        num_threads=cfg.get("num_threads"),
        channels_last=cfg.get("channels_last", False),
    )


def write_report(
    cfg: DictConfig, study: CachedStudy, pred: StudyPrediction, predictor: Predictor, synthetic: bool
) -> Path:
    """``<output_dir>/study_reports/<uid>/report.html`` and its PNGs for one scored study."""
    from cervspine.report.study import write_study_report

    out = Path(cfg.paths.output_dir) / "study_reports" / pred.uid
    threshold = cfg.get("report_threshold")
    return write_study_report(out, study, pred, predictor, synthetic=synthetic, threshold=threshold).html


def predict_study_folder(cfg: DictConfig, predictor: Predictor | None = None) -> StudyPrediction:
    """One DICOM folder, read and scored in memory (nothing is written to the cache)."""
    predictor = predictor or _predictor(cfg)
    study = InMemoryStudy(load_study(cfg.study), CacheParams(image_size=predictor.image_size))
    pred = predictor.predict(study)
    out = Path(cfg.paths.output_dir)
    write_json_atomic(out / "studies" / f"{pred.uid}.json", study_record(pred))
    if cfg.get("report"):  # synthetic when the folder sits in a generated RSNA folder (<root>/*_images/)
        synthetic = any(is_synthetic(a) for a in Path(cfg.study).resolve().parents[:2])
        print(f"report: {write_report(cfg, study, pred, predictor, synthetic)}")
    return pred


def predict_folder(cfg: DictConfig, predictor: Predictor | None = None) -> PredictResult:
    """Every study of ``data.root``'s test.csv; submission.csv only when all were scored."""
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude), require_images=False)
    if index.test is None or not len(index.test):
        raise FileNotFoundError(f"{cfg.data.root}: no test.csv rows to predict")
    predictor = predictor or _predictor(cfg)
    use_trained_image_size(cfg, predictor.image_size)
    out = Path(cfg.paths.output_dir)
    cache_dir = Path(cfg.data.cache_dir)
    params = CacheParams(image_size=cfg.data.image_size, segmentation_method=cfg.data.segmentation_method)
    result = PredictResult()
    uids = list(dict.fromkeys(index.test["StudyInstanceUID"]))
    missing = [u for u in uids if not index.study_dir(u).is_dir()]
    for u in missing:
        result.failed[u] = f"no study folder {index.study_dir(u)}"
    report = preprocess(index, cache_dir, params, workers=cfg.workers, splits=("test",), progress=False)
    result.failed.update(report.failed)
    for uid in uids:
        if uid in result.failed:
            continue
        try:
            pred = predictor.predict(CachedStudy(cache_dir / uid))
        except Exception as e:  # keep scoring the others; report at the end
            result.failed[uid] = f"{type(e).__name__}: {e}"
            continue
        result.predictions[uid] = pred.probabilities
        write_json_atomic(out / "studies" / f"{uid}.json", study_record(pred))
        if cfg.get("report"):
            try:  # a figure that fails must not cost the submission
                result.reports[uid] = write_report(
                    cfg, CachedStudy(cache_dir / uid), pred, predictor, is_synthetic(cfg.data.root)
                )
            except Exception:
                log.exception("%s: study report failed", uid)
    if result.reports:
        from cervspine.report.study import write_index

        write_index(out / "study_reports", result.reports, result.predictions, is_synthetic(cfg.data.root))
    if not result.failed:
        result.submission = out / "submission.csv"
        write_csv_atomic(submission_frame(index.test, result.predictions), result.submission)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    if cfg.get("study"):
        pred = predict_study_folder(cfg)
        for t, p in zip(TARGETS, pred.probabilities):
            print(f"{t:>16}: {p:.3f}")
        return
    result = predict_folder(cfg)
    if result.failed:
        print(
            f"submission.csv NOT written: {len(result.failed)} studies could not be scored:", file=sys.stderr
        )
        for uid, why in result.failed.items():
            print(f"  {uid}: {why}", file=sys.stderr)
        sys.exit(1)
    print(f"submission: {result.submission}")


if __name__ == "__main__":
    main()
