"""Training callbacks beyond Lightning's own."""

from __future__ import annotations

import contextlib

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


class ThroughputMonitor(Callback):
    """How fast training runs and whether it waits on its loader: ``throughput.json`` at the end of fit.

    Per training batch: the *wait* (from the end of the previous batch, or of validation, to the start of
    this one: the time the loop spent getting the batch from the DataLoader) and the *step* (forward,
    backward, optimizer; with CUDA synchronised at its end, so the GPU's work is counted). A step *waited*
    when its wait exceeds ``wait_threshold`` of its step time. The first ``skip_first`` batches (warm-up,
    workers starting, cudnn autotuning) are left out. Peak memory: CUDA's max allocated on a GPU; and the
    resident memory of the process and its loader workers, sampled every ``rss_interval_s`` by a thread
    (a step's activations peak inside the backward pass, not at its end).
    ``out``: the JSON file (default ``<trainer.default_root_dir>/throughput.json``).
    """

    def __init__(
        self,
        out: str | None = None,
        skip_first: int = 1,
        wait_threshold: float = 0.05,
        rss_interval_s: float = 0.2,
    ):
        self.out, self.skip_first, self.wait_threshold = out, int(skip_first), float(wait_threshold)
        self.rss_interval_s = float(rss_interval_s)
        self._sampler = None
        self._reset()

    def _reset(self) -> None:
        self.waits: list[float] = []
        self.steps: list[float] = []
        self.samples: list[int] = []
        self.peak_rss = 0
        self._t_prev: float | None = None
        self._t_start = 0.0
        self._wait = 0.0

    @staticmethod
    def _now() -> float:
        import time

        return time.perf_counter()

    @staticmethod
    def _batch_size(batch) -> int:
        import torch

        values = (
            batch.values()
            if isinstance(batch, dict)
            else batch
            if isinstance(batch, (list, tuple))
            else [batch]
        )
        for v in values:
            if isinstance(v, torch.Tensor) and v.ndim:
                return int(v.shape[0])
        return 1

    def _rss(self) -> int:
        try:
            import psutil

            proc = psutil.Process()
            total = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return int(total)
        except ImportError:  # psutil is a test extra: the process's own peak
            import resource

            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        self._reset()
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._start_sampler()

    def _start_sampler(self) -> None:
        import threading

        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.rss_interval_s):
                self.peak_rss = max(self.peak_rss, self._rss())

        thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        thread.start()
        self._sampler = (stop, thread)

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            stop, thread = self._sampler
            stop.set()
            thread.join(timeout=5)
            self._sampler = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_sampler()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t_prev = self._now()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t_prev = None  # validation is no wait of the training loader

    def on_validation_end(self, trainer, pl_module) -> None:
        self._t_prev = self._now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now()
        self._wait = now - self._t_prev if self._t_prev is not None else 0.0
        self._t_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import torch

        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = self._now()
        self.waits.append(self._wait)
        self.steps.append(now - self._t_start)
        self.samples.append(self._batch_size(batch))
        self.peak_rss = max(self.peak_rss, self._rss())
        self._t_prev = now

    def summary(self, pl_module=None) -> dict:
        import torch

        k = min(self.skip_first, max(len(self.steps) - 1, 0))
        waits, steps, samples = np.array(self.waits[k:]), np.array(self.steps[k:]), np.array(self.samples[k:])
        total = float(waits.sum() + steps.sum())
        out = {
            "batches": len(self.steps),
            "measured_batches": len(steps),
            "samples": int(samples.sum()),
            "batch_size": int(np.median(samples)) if len(samples) else None,
            "train_samples_per_s": float(samples.sum() / total) if total > 0 else None,
            "step_s_median": float(np.median(steps)) if len(steps) else None,
            "wait_s_median": float(np.median(waits)) if len(waits) else None,
            "waited_fraction": float(np.mean(waits > self.wait_threshold * steps)) if len(steps) else None,
            "wait_time_fraction": float(waits.sum() / total) if total > 0 else None,
            "wait_threshold": self.wait_threshold,
            "peak_rss_gib": self.peak_rss / 2**30,
            "device": str(pl_module.device) if pl_module is not None else None,
        }
        if pl_module is not None and pl_module.device.type == "cuda":
            out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        return out

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_sampler()
        if not trainer.is_global_zero:
            return
        from pathlib import Path

        from cervspine.io.atomic import write_json_atomic

        path = Path(self.out) if self.out else Path(trainer.default_root_dir) / "throughput.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.summary(pl_module))
