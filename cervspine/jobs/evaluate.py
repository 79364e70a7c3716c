"""Scoring a labelled folder (a validation fold, or every labelled study) with the full inference path:
``metrics.json`` (competition score with CI, the prior baseline, per-target metrics), ``predictions.csv``,
``operating_point.json`` (:mod:`cervspine.jobs.operating_point`) and, with ``report=true``, ``report/``
(figures and a self-contained ``report.html``, drawn at that operating point)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from cervspine import TARGETS
from cervspine.cache import CachedStudy, preprocess
from cervspine.data.folds import assign_folds
from cervspine.inference import Predictor
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.io.rsna import RsnaIndex, is_synthetic
from cervspine.jobs.cache import cache_for
from cervspine.jobs.operating_point import choose_for_evaluation
from cervspine.scoring.metrics import bootstrap_ci, classification_report, prior_baseline, rsna_score
from cervspine.scoring.table import StudyPredictions

log = logging.getLogger(__name__)


def select_studies(
    index: RsnaIndex, fold: int | None, n_folds: int, fold_seed: int
) -> tuple[list[str], list[str]]:
    """(evaluated uids, the other labelled uids): the fold's studies, or every labelled study for None."""
    uids = sorted(index.train_uids)
    if fold is None:
        return uids, []
    folds = assign_folds(index.labels, n_folds, fold_seed)
    return [u for u in uids if folds[u] == fold], [u for u in uids if folds[u] != fold]


def score(
    y: np.ndarray, p: np.ndarray, y_prior_source: np.ndarray, synthetic: bool, n_boot: int = 1000
) -> dict:
    """The metrics.json body: competition score with CI, prior baseline, per-target report."""
    report = classification_report(y, p)
    prior = prior_baseline(y_prior_source)
    prior_score = rsna_score(y, np.tile(prior, (len(y), 1)))
    lo, hi = bootstrap_ci(y, p, rsna_score, n=n_boot) if len(y) > 1 else (float("nan"), float("nan"))
    return {
        "data": "synthetic" if synthetic else "real",
        "note": "SYNTHETIC DATA: these numbers say nothing about real CT" if synthetic else "",
        "n_studies": int(len(y)),
        "rsna_score": float(report["rsna_score"]),
        "rsna_score_ci95": [lo, hi],
        "prior_baseline_rsna_score": float(prior_score),
        "score_ratio_to_prior": float(report["rsna_score"] / prior_score),
        "per_target": {t: report[t] for t in TARGETS},
        "macro": report["macro"],
    }


def calibrated_on(predictor: Predictor, root: str | Path, fold: int | None) -> bool:
    """Whether a member's study calibration was fitted on ``root``/``fold`` (the fold it validated on)."""
    if fold is None:
        return False
    for member in predictor.stage2:
        hp = member.data_hp
        same_root = Path(str(hp.get("root", ""))).resolve() == Path(root).resolve()
        if member.calibrated and same_root and hp.get("fold") is not None and int(hp["fold"]) == int(fold):
            return True
    return False


def evaluate(cfg: DictConfig, predictor: Predictor | None = None) -> dict[str, Any]:
    """The ``evaluate`` config's job (``predictor``: built from ``cfg.predictor`` when not given)."""
    predictor = predictor or instantiate(cfg.predictor)
    out_dir = Path(cfg.paths.output_dir)
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude))
    fold = cfg.get("fold")
    uids, others = select_studies(index, fold, cfg.data.n_folds, cfg.data.fold_seed)
    if not uids:
        raise RuntimeError(f"{cfg.data.root}: no labelled study to evaluate (fold={fold})")
    cache_dir, params = cache_for(cfg.data, predictor.image_size)
    built = preprocess(index, cache_dir, params, workers=cfg.workers, splits=("train",), progress=False)
    if not built.ok:
        raise RuntimeError(f"preprocessing failed: {built.failed}")
    p = np.stack([predictor.predict(CachedStudy(cache_dir / uid)).probabilities for uid in uids])
    y = index.labels.loc[uids, list(TARGETS)].to_numpy(np.float64)
    y_prior = index.labels.loc[others or uids, list(TARGETS)].to_numpy(np.float64)
    synthetic = is_synthetic(cfg.data.root)
    metrics = score(y, p, y_prior, synthetic, n_boot=cfg.get("n_bootstrap", 1000))
    checkpoints = [str(c) for c in predictor.checkpoints]
    metrics.update(
        {
            "fold": fold,
            "stage1_ckpt": str(predictor.stage1.checkpoint),
            "stage2_ckpt": checkpoints if len(checkpoints) > 1 else checkpoints[0],
            "data_root": str(cfg.data.root),
        }
    )
    if not others:
        metrics["note"] += " Prior baseline computed in-sample (no held-out split)."
    if calibrated_on(predictor, cfg.data.root, fold):
        metrics["note"] += (
            " Stage 2's study calibration (4 parameters) was fitted on these same studies; its"
            " cross-fitted validation score is val/rsna_score in the training logs."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    op = choose_for_evaluation(cfg, y, p, out_dir, synthetic)  # operating_point.json, before metrics.json
    metrics["operating_point"] = op.as_dict()
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_csv_atomic(StudyPredictions(uids, p, y).to_frame(), out_dir / "predictions.csv")
    if cfg.get("report"):
        from cervspine.report.evaluation import write_evaluation_report

        stage2 = metrics["stage2_ckpt"]
        rep = write_evaluation_report(
            out_dir / "report",
            y,
            p,
            synthetic=synthetic,
            threshold=op.thresholds() if cfg.get("report_threshold") is None else cfg.report_threshold,
            n_boot=cfg.get("n_bootstrap", 1000),
            metrics=metrics,
            subtitle=f"{cfg.data.root} — fold {fold} — {len(uids)} studies — stage 2: {stage2}",
        )
        metrics["report"] = str(rep.html)
    return metrics
