"""Optimizer + timm cosine schedule (warmup, restarts) shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from timm.scheduler import CosineLRScheduler


class OptimizedModule(L.LightningModule):
    """Adds ``configure_optimizers`` from an optimizer partial and a schedule dict.

    ``scheduler``: ``warmup_epochs`` (float), ``cycles`` (restarts = cycles − 1), ``cycle_decay`` (peak lr
    factor per restart), ``min_lr_ratio``, ``warmup_lr_ratio``; stepped every optimizer update.
    """

    optimizer_factory: Callable[..., torch.optim.Optimizer]
    scheduler_cfg: dict[str, Any] | None

    def configure_optimizers(self):
        opt = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if not self.scheduler_cfg:
            return opt
        cfg = dict(self.scheduler_cfg)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        per_epoch = max(total // epochs, 1)
        cycles = max(int(cfg.get("cycles", 1)), 1)
        base_lr = opt.param_groups[0]["lr"]
        sched = CosineLRScheduler(
            opt,
            t_initial=max(total // cycles, 1),
            lr_min=base_lr * float(cfg.get("min_lr_ratio", 0.01)),
            warmup_t=int(float(cfg.get("warmup_epochs", 0)) * per_epoch),
            warmup_lr_init=base_lr * float(cfg.get("warmup_lr_ratio", 0.01)),
            cycle_limit=cycles,
            cycle_decay=float(cfg.get("cycle_decay", 1.0)),
            t_in_epochs=False,
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)
