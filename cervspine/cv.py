"""``python -m cervspine.cv dir=multirun/train/<time>``: gather k-fold out-of-fold predictions.

Reads every ``oof_predictions.csv`` below ``dir`` (one per fold run of
``python -m cervspine.train -m experiment=... data.fold=0,1,2,3,4``), checks that each study appears once,
and writes ``cv_metrics.json`` and ``cv_table.csv`` (per target and per fold) next to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cervspine import TARGETS
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.scoring.metrics import classification_report, rsna_score


def gather(folder: str | Path) -> pd.DataFrame:
    files = sorted(Path(folder).rglob("oof_predictions.csv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no oof_predictions.csv below it (run the folds first)")
    table = pd.concat([pd.read_csv(f, dtype={"StudyInstanceUID": str}) for f in files], ignore_index=True)
    dup = table["StudyInstanceUID"].duplicated(keep=False)
    if dup.any():
        raise ValueError(
            f"{folder}: studies predicted by more than one fold run: "
            f"{sorted(set(table.loc[dup, 'StudyInstanceUID']))[:5]} (mixed sweeps?)"
        )
    return table


def cross_validate(folder: str | Path) -> dict[str, Any]:
    table = gather(folder)
    y = table[[f"label_{t}" for t in TARGETS]].to_numpy(np.float64)
    p = table[list(TARGETS)].to_numpy(np.float64)
    report = classification_report(y, p)
    rows = [
        {"target": t, **{k: report[t][k] for k in ("auroc", "f1", "accuracy", "precision", "recall")}}
        for t in TARGETS
    ]
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


@hydra.main(version_base="1.3", config_path="../conf", config_name="cv")
def main(cfg: DictConfig) -> None:
    out = cross_validate(cfg.dir)
    print(f"{out['n_studies']} studies, folds {out['folds']}: CV rsna_score {out['rsna_score']:.4f}")
    for f, s in out["rsna_score_per_fold"].items():
        print(f"  fold {f}: {s:.4f}")


if __name__ == "__main__":
    main()
