"""Training callbacks beyond Lightning's own."""

from __future__ import annotations

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMAWeightAveraging(WeightAveraging):
    """Exponential moving average of the weights; validation and the saved model use the average."""

    def __init__(self, decay: float = 0.999, **kwargs):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), **kwargs)


class ReportImagesCallback(Callback):
    """At the end of fit, draw the validation ROC curves and log them as an image to every WandbLogger.

    The study-level predictions are the module's ``last_val_predictions`` (``(uids, predictions (n, 8),
    labels (n, 8))``, set by the fracture classifier's last validation epoch). Does nothing without a
    WandbLogger or without such predictions.
    """

    def __init__(self, key: str = "val/roc_curves"):
        self.key = key

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from cervspine.report.wandb_images import log_figures, wandb_loggers

        last = getattr(pl_module, "last_val_predictions", None)
        if last is None or not trainer.is_global_zero or not wandb_loggers(trainer.loggers):
            return
        from cervspine.report.figures import roc_figure
        from cervspine.runs import is_synthetic

        _, preds, labels = last
        root = getattr(getattr(trainer, "datamodule", None), "root", None)
        synthetic = root is not None and is_synthetic(root)
        fig = roc_figure(np.asarray(labels, np.float64), np.asarray(preds, np.float64), synthetic=synthetic)
        log_figures(trainer.loggers, {self.key: fig}, step=trainer.global_step)
