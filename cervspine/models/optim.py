"""Optimizer and learning-rate schedule of the LightningModules, both given by the config.

``model.optimizer`` is a partial of any ``torch.optim`` class; ``model.scheduler`` a partial of a factory
called as ``factory(optimizer, num_epochs=E, updates_per_epoch=U)`` — timm's signature, so
``timm.scheduler.create_scheduler_v2`` (with ``step_on_epochs: false``) works as it is — returning a timm
scheduler (stepped per update with ``step_update``), a torch ``LRScheduler`` (``step()`` per update) or
timm's ``(scheduler, epochs)`` pair. The default, :func:`warmup_cosine`, is timm's cosine schedule with a
warmup and restarts, sized from ratios of the base learning rate.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from timm.scheduler import CosineLRScheduler

SchedulerFactory = Callable[..., Any]


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    num_epochs: int,
    updates_per_epoch: int,
    *,
    total_updates: int | None = None,
    warmup_epochs: float = 0.0,
    cycles: int = 1,
    cycle_decay: float = 1.0,
    min_lr_ratio: float = 0.01,
    warmup_lr_ratio: float = 0.01,
) -> CosineLRScheduler:
    """Cosine decay over ``num_epochs × updates_per_epoch`` optimizer updates in ``cycles`` equal cycles
    (restarts = cycles − 1, each peak ``cycle_decay`` × the last), after ``warmup_epochs`` of linear
    warmup from ``warmup_lr_ratio`` × lr; the floor is ``min_lr_ratio`` × lr. ``total_updates``: the exact
    count where it is not a multiple of the epochs (``trainer.max_steps`` cutting the last epoch short)."""
    per_epoch = max(int(updates_per_epoch), 1)
    total = max(int(total_updates or int(num_epochs) * per_epoch), 1)
    cycles = max(int(cycles), 1)
    base_lr = optimizer.param_groups[0]["lr"]
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total // cycles, 1),
        lr_min=base_lr * float(min_lr_ratio),
        warmup_t=int(float(warmup_epochs) * per_epoch),
        warmup_lr_init=base_lr * float(warmup_lr_ratio),
        cycle_limit=cycles,
        cycle_decay=float(cycle_decay),
        t_in_epochs=False,
    )


def scheduler_factory(spec: SchedulerFactory | dict[str, Any] | None) -> SchedulerFactory | None:
    """A callable factory; a plain dict (how checkpoints before the configs' ``_target_`` stored it) means
    :func:`warmup_cosine` with those options."""
    if spec is None or (callable(spec) and not isinstance(spec, Mapping)):
        return spec
    return functools.partial(warmup_cosine, **dict(spec))


class OptimizedModule(L.LightningModule):
    """``configure_optimizers`` from ``optimizer_factory`` and ``scheduler_cfg`` (module docstring)."""

    optimizer_factory: Callable[..., torch.optim.Optimizer]
    scheduler_cfg: SchedulerFactory | dict[str, Any] | None

    def configure_optimizers(self):
        opt = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        factory = scheduler_factory(self.scheduler_cfg)
        if factory is None:
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        exact = {"total_updates": total} if "total_updates" in inspect.signature(factory).parameters else {}
        sched = factory(opt, num_epochs=epochs, updates_per_epoch=max(total // epochs, 1), **exact)
        if isinstance(sched, tuple):  # timm's create_scheduler_v2: (scheduler, epochs)
            sched = sched[0]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["model_class"] = type(self).__name__  # lets inference pick the stage's strategy

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if hasattr(scheduler, "step_update"):  # timm schedulers: the lr of this update number
            scheduler.step_update(num_updates=self.global_step)
        else:
            scheduler.step()
