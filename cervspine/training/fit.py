"""Fitting one model from a composed train config: instantiate data, model, callbacks, loggers and trainer;
fit (resuming from ``ckpt_path``); record the run; write the out-of-fold predictions."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import cervspine.models.safe_load  # noqa: F401  (registers the classes our checkpoints hold: weights_only)
from cervspine.io.atomic import write_json_atomic
from cervspine.models.backbones import check_weights
from cervspine.runs.info import save_run_info
from cervspine.training.ddp import patch_lightning_hydra_ddp
from cervspine.training.oof import write_oof_predictions

log = logging.getLogger(__name__)


def _output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` → ``<run dir>/checkpoints/last.ckpt`` (None, with a warning, when it does not exist yet)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        p = output_dir / "checkpoints" / "last.ckpt"
        if not p.is_file():
            log.warning("ckpt_path=last but %s does not exist: starting from scratch", p)
            return None
        return str(p)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint at {ckpt_path}")
    return str(ckpt_path)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def _prepare_wandb(cfg: DictConfig, output_dir: Path, resuming: bool) -> None:
    """Reuse the run's W&B id on resume so the dashboard shows one continuous run."""
    wb = cfg.get("logger", {}).get("wandb") if cfg.get("logger") else None
    if wb is None:
        return
    info = output_dir / "run_info.json"
    with open_dict(cfg):
        if resuming and info.is_file() and not wb.get("id"):
            run_id = json.loads(info.read_text()).get("wandb_run_id")
            if run_id:
                wb.id = run_id
                wb.resume = "allow"


class NoGpuError(RuntimeError):
    """A recipe asks for CUDA devices this machine does not have."""


def check_accelerator(cfg: DictConfig, where: str = "") -> None:
    """Refuse, naming the override that runs it on the CPU, a GPU recipe on a machine without (enough)
    CUDA devices, before anything is built (Lightning's own error comes later and names no override)."""
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = cfg.get("experiment_name") or "this recipe"
    where = where or "add"
    if found == 0:
        raise NoGpuError(
            f"{name} trains on a GPU (trainer.accelerator={accelerator}) and this machine has no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): {where} trainer=cpu (or "
            "trainer.accelerator=cpu trainer.precision=32-true) to train on the CPU, slowly at the recipe's "
            "sizes; `python -m cervspine.pipeline ... smoke=true` runs a whole job shrunk to minutes on a CPU"
        )
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > found:
        raise NoGpuError(
            f"{name}: trainer.devices={devices} but this machine has {found} CUDA device(s): "
            f"{where} trainer.devices={found}"
        )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit ``cfg.model`` on ``cfg.data``; returns (metrics, objects). Tests call this directly."""
    check_accelerator(cfg)
    check_weights(OmegaConf.select(cfg, "model.backbone", default=None), read_file=False)  # in seconds
    patch_lightning_hydra_ddp()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = _output_dir(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    _prepare_wandb(cfg, output_dir, resuming=ckpt_path is not None)

    env_before = dict(os.environ)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    extra = {}
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
            extra["wandb_run_id"] = lg.experiment.id  # starts the (offline or online) run now
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if trainer.is_global_zero:
        save_run_info(cfg, output_dir, extra=extra, print_config=cfg.get("print_config", True))

    objects: dict[str, Any] = {"trainer": trainer, "model": model, "datamodule": datamodule}
    try:
        # our own checkpoints hold the config (DictConfig, optimizer partial): not weights-only
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        ckpt_cb = trainer.checkpoint_callback
        best_path = getattr(ckpt_cb, "best_model_path", None) if ckpt_cb is not None else None
        write_oof_predictions(trainer, model, datamodule, output_dir, best_path)  # every rank validates
        if ckpt_cb is not None and trainer.is_global_zero:
            best = getattr(ckpt_cb, "best_model_score", None)
            summary = {
                "best_model_path": best_path,
                "best_score": None if best is None else float(best),
                "last_model_path": str(output_dir / "checkpoints" / "last.ckpt")
                if (output_dir / "checkpoints" / "last.ckpt").is_file()
                else None,
                "monitor": cfg.get("optimized_metric"),
                "global_step": trainer.global_step,
                "metrics": metrics,
            }
            write_json_atomic(output_dir / "train_summary.json", summary)
            objects["summary"] = summary
            if best is not None:
                metrics[f"{cfg.optimized_metric}_best"] = float(best)
    finally:
        _close_loggers(loggers)
        _teardown_distributed(env_before)
    return metrics, objects


def _teardown_distributed(env_before: dict[str, str]) -> None:
    """End this run's process group and its rendezvous variables, so the next job of a multirun
    (same process) starts its own DDP instead of reusing a group whose peers have exited."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "RANK"):
        if key not in env_before:
            os.environ.pop(key, None)


def _close_loggers(loggers: list[Any]) -> None:
    """Finish W&B runs even on error, so the next job of a multirun starts cleanly."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            except Exception as e:  # closing must never hide the real error
                log.warning("wandb.finish failed: %s", e)


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimizes: the best checkpoint's score when there is one."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    value = metrics.get(f"{name}_best", metrics.get(name))
    return None if value is None or math.isnan(value) else float(value)
