"""Training guards: nothing a fault can lose or corrupt.

* :class:`NonFiniteLossGuard` stops (or skips the batch) on a NaN/Inf loss before it reaches the weights;
* :class:`AtomicCheckpoints` makes checkpoint writes atomic (temp file next to the target, fsync,
  ``os.replace``), so a kill or a full disk during a save leaves the previous ``last.ckpt`` intact.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.optim import Optimizer

log = logging.getLogger(__name__)

ACTIONS = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/Inf loss (or gradient) and the guard stopped it."""


class NonFiniteLossGuard(Callback):
    """Watch every training loss; on NaN/Inf drop the gradients before ``optimizer.step()``.

    The weights (and the optimizer state) are therefore never updated from a non-finite loss, so every
    checkpoint written so far, and every later one, holds finite weights. Then:

    * ``action="stop"``: raise :class:`NonFiniteLossError` naming the epoch, step and last checkpoint
      (the run exits non-zero; resume from ``last.ckpt`` after fixing the cause);
    * ``action="skip"``: skip that optimizer step with a warning and go on; more than
      ``max_consecutive_skips`` skipped steps in a row stop as above. The logged ``train/loss`` of the
      epoch still includes the non-finite values.

    ``check_gradients`` also treats non-finite gradients as bad (off by default: under fp16 AMP the
    gradient scaler already skips such steps). Under DDP the decision is shared by all ranks, so they
    stop or skip together.
    """

    def __init__(self, action: str = "stop", max_consecutive_skips: int = 5, check_gradients: bool = False):
        if action not in ACTIONS:
            raise ValueError(f"NonFiniteLossGuard action must be one of {ACTIONS}, got {action!r}")
        if max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be >= 0, got {max_consecutive_skips}")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.check_gradients = check_gradients
        self.skipped = 0  # in this process (not restored on resume)
        self.consecutive = 0
        self._bad_loss: float | None = None  # a non-finite loss seen since the last optimizer step

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        if self._bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = float(loss.detach().float().flatten()[0])

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        bad_loss, self._bad_loss = self._bad_loss, None
        bad_grad = self.check_gradients and bad_loss is None and not _gradients_finite(optimizer)
        if not trainer.strategy.reduce_boolean_decision(bad_loss is not None or bad_grad, all=False):
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)  # the step then changes neither weights nor optimizer state
        if bad_loss is not None:
            what = f"loss ({bad_loss})"
        else:
            what = "gradient" if bad_grad else "loss on another rank"
        where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
        if self.action == "skip" and self.consecutive < self.max_consecutive_skips:
            self.skipped += 1
            self.consecutive += 1
            log.warning(
                "non-finite training %s at %s: optimizer step skipped (%d in all)", what, where, self.skipped
            )
            return
        if self.action == "skip":
            reason = f"{self.consecutive + 1} in a row, max_consecutive_skips={self.max_consecutive_skips}"
        else:
            reason = "action=stop"
        raise NonFiniteLossError(
            f"non-finite training {what} at {where}; stopped ({reason}) before the optimizer step, so the "
            f"weights were not updated. Last checkpoint: {_last_checkpoint(trainer) or 'none yet'}. Fix the "
            "cause and resume with ckpt_path=last, or set callbacks.nonfinite_loss_guard.action=skip."
        )


def _gradients_finite(optimizer: Optimizer) -> bool:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint: a ``last`` one, else the latest of an unmonitored callback, else the best."""
    callbacks = trainer.checkpoint_callbacks
    candidates = [getattr(cb, "last_model_path", "") for cb in callbacks]
    candidates += [cb.best_model_path for cb in callbacks if getattr(cb, "monitor", "") is None]
    candidates += [getattr(cb, "best_model_path", "") for cb in callbacks]
    return next((p for p in candidates if p), None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves are atomic.

    Lightning's own save writes a temp file in the *system* temp folder and moves it into place; when
    the checkpoint folder is on another filesystem that move is a copy over the old file, so a kill or
    a full disk mid-copy destroys ``last.ckpt`` (and leaves the temp file behind). Here the temp file
    lives next to the target and replaces it with ``os.replace`` after an fsync; on any error it is
    removed and the old file is untouched. Remote paths (``s3://`` …) use Lightning's save.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            buffer = io.BytesIO()  # serialize first: a write error then surfaces as a plain OSError (ENOSPC)
            torch.save(checkpoint, buffer)
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class AtomicCheckpoints(Callback):
    """Install :class:`AtomicCheckpointIO` as the trainer's checkpoint writer (when it uses the default)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
