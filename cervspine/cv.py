"""``python -m cervspine.cv dir=multirun/train/<time>``: gather k-fold out-of-fold predictions.

Reads every ``oof_predictions.csv`` below ``dir`` (one per fold run of
``python -m cervspine.train -m experiment=... data.fold=0,1,2,3,4``), checks that each study appears once,
and writes ``cv_metrics.json`` and ``cv_table.csv`` (per target and per fold) next to them.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cervspine.training.oof import cross_validate


@hydra.main(version_base="1.3", config_path="../conf", config_name="cv")
def main(cfg: DictConfig) -> None:
    out = cross_validate(cfg.dir)
    print(f"{out['n_studies']} studies, folds {out['folds']}: CV rsna_score {out['rsna_score']:.4f}")
    for f, s in out["rsna_score_per_fold"].items():
        print(f"  fold {f}: {s:.4f}")


if __name__ == "__main__":
    main()
