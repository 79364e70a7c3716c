"""``python -m cervspine.evaluate data.root=DIR run_dir=RUN``: score a fold (or a whole labelled folder).

Runs the full inference path (both stages + aggregation, exactly as predict does) on the chosen labelled
studies; writes ``metrics.json`` and ``predictions.csv`` (per study: predictions and labels). With
``report=true`` also ``report/`` (figures, a self-contained ``report.html``; see :mod:`cervspine.report`);
``report_threshold=`` fixes the operating threshold (else Youden's J on the evaluated predictions).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

import cervspine.config  # noqa: F401
from cervspine import TARGETS
from cervspine.cache import CachedStudy, CacheParams, preprocess
from cervspine.data.folds import assign_folds
from cervspine.inference import Predictor, load_predictor
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.io.rsna import RsnaIndex
from cervspine.runs.layout import is_synthetic, stage_checkpoints, use_trained_image_size
from cervspine.scoring.metrics import bootstrap_ci, classification_report, prior_baseline, rsna_score

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


def _own_validation_fold(predictor: Predictor, root: str | Path, fold: int | None) -> bool:
    """Whether ``root``/``fold`` is the fold stage 2 validated (and calibrated) on."""
    hp = predictor.data2.extra if predictor.data2 is not None else {}
    same_root = Path(str(hp.get("root", ""))).resolve() == Path(root).resolve()
    return same_root and fold is not None and hp.get("fold") is not None and int(hp["fold"]) == int(fold)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Entry point body (tests and the pipeline call it)."""
    out_dir = Path(cfg.paths.output_dir)
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude))
    fold = cfg.get("fold")
    uids, others = select_studies(index, fold, cfg.data.n_folds, cfg.data.fold_seed)
    if not uids:
        raise RuntimeError(f"{cfg.data.root}: no labelled study to evaluate (fold={fold})")
    s1, s2 = stage_checkpoints(cfg.get("run_dir"), cfg.ckpt.stage1, cfg.ckpt.stage2)
    predictor = load_predictor(s1, s2, device=cfg.device, batch_size=cfg.batch_size)
    use_trained_image_size(cfg, predictor.image_size)
    cache_dir = Path(cfg.data.cache_dir)
    params = CacheParams(image_size=cfg.data.image_size, segmentation_method=cfg.data.segmentation_method)
    report = preprocess(index, cache_dir, params, workers=cfg.workers, splits=("train",), progress=False)
    if not report.ok:
        raise RuntimeError(f"preprocessing failed: {report.failed}")
    rows = []
    for uid in uids:
        pred = predictor.predict(CachedStudy(cache_dir / uid))
        rows.append(pred.probabilities)
    p = np.stack(rows)
    y = index.labels.loc[uids, list(TARGETS)].to_numpy(np.float64)
    y_prior = index.labels.loc[others or uids, list(TARGETS)].to_numpy(np.float64)
    synthetic = is_synthetic(cfg.data.root)
    metrics = score(y, p, y_prior, synthetic, n_boot=cfg.get("n_bootstrap", 1000))
    metrics.update(
        {
            "fold": fold,
            "stage1_ckpt": str(s1),
            "stage2_ckpt": [str(p) for p in s2] if isinstance(s2, list) else str(s2),
            "data_root": str(cfg.data.root),
        }
    )
    if not others:
        metrics["note"] += " Prior baseline computed in-sample (no held-out split)."
    if predictor.calibrated and _own_validation_fold(predictor, cfg.data.root, fold):
        metrics["note"] += (
            " Stage 2's study calibration (4 parameters) was fitted on these same studies; its"
            " cross-fitted validation score is val/rsna_score in the training logs."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "metrics.json", metrics)
    table = pd.DataFrame(p, columns=list(TARGETS))
    table.insert(0, "StudyInstanceUID", uids)
    for t in TARGETS:
        table[f"label_{t}"] = y[:, list(TARGETS).index(t)].astype(int)
    write_csv_atomic(table, out_dir / "predictions.csv")
    if cfg.get("report"):
        from cervspine.report.evaluation import write_evaluation_report

        rep = write_evaluation_report(
            out_dir / "report",
            y,
            p,
            synthetic=synthetic,
            threshold=cfg.get("report_threshold"),
            n_boot=cfg.get("n_bootstrap", 1000),
            metrics=metrics,
            subtitle=f"{cfg.data.root} — fold {fold} — {len(uids)} studies — stage 2: {s2}",
        )
        metrics["report"] = str(rep.html)
        print(f"report: {rep.html}")
    print_metrics(metrics)
    return metrics


def print_metrics(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    kind = metrics["data"].upper()
    table = Table(title=f"Validation metrics — {kind} DATA ({metrics['n_studies']} studies)")
    for col in ("target", "AUROC", "F1", "accuracy", "precision", "recall"):
        table.add_column(col)
    for t, r in metrics["per_target"].items():
        table.add_row(t, *(f"{r[k]:.3f}" for k in ("auroc", "f1", "accuracy", "precision", "recall")))
    lo, hi = metrics["rsna_score_ci95"]
    console = Console()
    console.print(table)
    console.print(
        f"rsna_score {metrics['rsna_score']:.4f} (95% CI {lo:.3f}–{hi:.3f}); prior baseline "
        f"{metrics['prior_baseline_rsna_score']:.4f}; ratio {metrics['score_ratio_to_prior']:.2f} "
        f"[{kind} data]"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
