"""Out-of-fold predictions: each fold run's ``oof_predictions.csv`` (its validation studies scored by its
best checkpoint, a :class:`~cervspine.scoring.table.StudyPredictions` table with a fold column), and the
k-fold CV score of a sweep's folds gathered together (``python -m cervspine.cv``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd

import cervspine.models.safe_load  # noqa: F401  (registers the classes our checkpoints hold: weights_only)
from cervspine import TARGETS
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.models.study_validation import StudyValidation
from cervspine.scoring.metrics import METRICS, classification_report, rsna_score
from cervspine.scoring.table import StudyPredictions

OOF_FILE = "oof_predictions.csv"


def write_oof_predictions(
    trainer: L.Trainer,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    output_dir: Path,
    best_path: str | None,
) -> None:
    """Validation-fold study predictions of the best checkpoint → ``oof_predictions.csv`` (for k-fold CV)."""
    if not isinstance(model, StudyValidation) or trainer.fast_dev_run:
        return
    if best_path and Path(best_path).is_file():
        trainer.validate(model, datamodule=datamodule, ckpt_path=best_path, verbose=False, weights_only=True)
    if model.last_val_predictions is None or not trainer.is_global_zero:
        return
    table = model.last_val_predictions.to_frame(fold=getattr(datamodule, "fold", -1))
    write_csv_atomic(table, output_dir / OOF_FILE)


def gather(folder: str | Path) -> pd.DataFrame:
    """Every ``oof_predictions.csv`` below ``folder`` in one table; each study must appear once."""
    files = sorted(Path(folder).rglob(OOF_FILE))
    if not files:
        raise FileNotFoundError(f"{folder}: no {OOF_FILE} below it (run the folds first)")
    tables = [pd.read_csv(f, dtype={"StudyInstanceUID": str}) for f in files]
    for f, t in zip(files, tables):
        StudyPredictions.from_frame(t, f)  # checks the columns
    table = pd.concat(tables, ignore_index=True)
    dup = table["StudyInstanceUID"].duplicated(keep=False)
    if dup.any():
        raise ValueError(
            f"{folder}: studies predicted by more than one fold run: "
            f"{sorted(set(table.loc[dup, 'StudyInstanceUID']))[:5]} (mixed sweeps?)"
        )
    return table


def cross_validate(folder: str | Path) -> dict[str, Any]:
    """The CV score of the gathered folds → ``cv_metrics.json`` and ``cv_table.csv`` in ``folder``."""
    table = gather(folder)
    oof = StudyPredictions.from_frame(table, folder)
    y, p = oof.labels, oof.predictions
    report = classification_report(y, p)
    rows = [{"target": t, **{k: report[t][k] for k in METRICS}} for t in TARGETS]
    per_fold = {int(f): rsna_score(y[g.index], p[g.index]) for f, g in table.groupby("fold")}
    out = {
        "n_studies": len(table),
        "folds": sorted(per_fold),
        "rsna_score": report["rsna_score"],
        "rsna_score_per_fold": per_fold,
        "macro": report["macro"],
    }
    write_json_atomic(Path(folder) / "cv_metrics.json", out)
    write_csv_atomic(pd.DataFrame(rows), Path(folder) / "cv_table.csv")
    return out
