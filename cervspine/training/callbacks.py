"""Training callbacks beyond Lightning's own."""

from __future__ import annotations

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from cervspine.models.study_validation import StudyValidation


class EMAWeightAveraging(WeightAveraging):
    """Exponential moving average of the weights; validation and the saved model use the average.

    Buffers that a module *sets* rather than learns (named in its ``pinned_buffers``: a training prior, a
    sampling logit shift, a fitted calibration) are copied into the average as they are, not averaged:
    an average of them would lag behind their current value (and start from their defaults).
    """

    def __init__(self, decay: float = 0.999, **kwargs):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), **kwargs)

    def _pin(self, pl_module: L.LightningModule) -> None:
        if self._average_model is None:
            return
        average = self._average_model.module
        for name in getattr(pl_module, "pinned_buffers", ()):
            getattr(average, name).copy_(getattr(pl_module, name))

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        self._pin(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._pin(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._pin(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module) -> None:
        self._pin(pl_module)
        super().on_train_end(trainer, pl_module)


class ReportImagesCallback(Callback):
    """At the end of fit, draw the validation ROC curves and log them as an image to every WandbLogger.

    The study-level predictions are the module's ``last_val_predictions`` (a
    :class:`~cervspine.scoring.table.StudyPredictions`, set by every stage-2 model's last validation epoch).
    Does nothing without a WandbLogger or without such predictions.
    """

    def __init__(self, key: str = "val/roc_curves"):
        self.key = key

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from cervspine.report.wandb_images import log_figures, wandb_loggers

        last = pl_module.last_val_predictions if isinstance(pl_module, StudyValidation) else None
        if last is None or not trainer.is_global_zero or not wandb_loggers(trainer.loggers):
            return
        from cervspine.io.rsna import is_synthetic
        from cervspine.report.figures import roc_figure

        root = getattr(getattr(trainer, "datamodule", None), "root", None)
        synthetic = root is not None and is_synthetic(root)
        y, p = (np.asarray(a, np.float64) for a in (last.labels, last.predictions))
        fig = roc_figure(y, p, synthetic=synthetic)
        log_figures(trainer.loggers, {self.key: fig}, step=trainer.global_step)
