"""What every stage-2 LightningModule does at the end of a validation epoch: study-level predictions of
the fold (:class:`~cervspine.scoring.table.StudyPredictions`, kept as ``last_val_predictions`` for the
out-of-fold writer and the W&B images callback) and their metrics, logged under the same names."""

from __future__ import annotations

import numpy as np
import torch

from cervspine import TARGETS
from cervspine.scoring.metrics import classification_report, prior_baseline
from cervspine.scoring.table import StudyPredictions

PER_TARGET = ("auroc", "f1", "accuracy")
MACRO = ("auroc", "f1", "accuracy", "precision", "recall")


class StudyValidation:
    """Mixin of the stage-2 LightningModules (the contract the OOF writer relies on). A module using it
    registers a ``prior`` buffer (8,): the training studies' prevalences once fitting starts (the RSNA
    train set's before), what a level stage 1 cannot find falls back to."""

    last_val_predictions: StudyPredictions | None = None

    def set_training_prior(self) -> None:
        """``prior`` ← the prevalences of the DataModule's training studies (at fit start)."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "labels") and getattr(dm, "train_uids", None):
            prior = prior_baseline(dm.labels(dm.train_uids))
            self.prior.copy_(torch.as_tensor(prior, dtype=torch.float32))

    def training_prior(self) -> np.ndarray:
        return self.prior.detach().cpu().numpy().astype(np.float64)

    def log_study_validation(self, preds: StudyPredictions, extra: dict[str, float] | None = None) -> None:
        """Keep ``preds`` and log ``val/rsna_score``, ``val/<metric>_<target>``, ``val/<metric>_macro``
        (finite values only) plus ``extra``, from rank 0."""
        self.last_val_predictions = preds
        report = classification_report(preds.labels, preds.predictions)
        logged = {"val/rsna_score": report["rsna_score"], **(extra or {})}
        for t in TARGETS:
            for k in PER_TARGET:
                if np.isfinite(report[t][k]):
                    logged[f"val/{k}_{t}"] = report[t][k]
        for k in MACRO:
            if np.isfinite(report["macro"][k]):
                logged[f"val/{k}_macro"] = report["macro"][k]
        self.log_dict({k: float(v) for k, v in logged.items()}, rank_zero_only=True)
