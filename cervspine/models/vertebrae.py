"""Stage 1: which of C1..C7 each slice shows, and where the cervical spine lies in the slice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAccuracy, MultilabelAUROC, MultilabelF1Score

from cervspine import VERTEBRAE
from cervspine.models.backbones import BackboneSpec, build_backbone, fast_backbone
from cervspine.models.optim import OptimizedModule, SchedulerFactory


class VertebraeDetector(OptimizedModule):
    """timm backbone → 7 presence logits (multi-label) + a normalised spine box (y0, x0, y1, x1)."""

    def __init__(
        self,
        backbone: BackboneSpec,
        in_chans: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory | dict[str, Any] | None = None,
        pos_weight: float | list[float] = 1.0,
        box_loss_weight: float = 1.0,
        dropout: float = 0.2,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.backbone = build_backbone(backbone, in_chans)
        width = self.backbone.num_features
        self.dropout = nn.Dropout(dropout)
        self.presence_head = nn.Linear(width, len(VERTEBRAE))
        self.box_head = nn.Linear(width, 4)
        pw = torch.as_tensor(pos_weight, dtype=torch.float32).expand(len(VERTEBRAE)).clone()
        self.register_buffer("pos_weight", pw)
        self.box_loss_weight = box_loss_weight
        self.optimizer_factory, self.scheduler_cfg = optimizer, scheduler
        self.channels_last = channels_last
        self.backbone = fast_backbone(self.backbone, channels_last=channels_last, compile=compile)
        n = len(VERTEBRAE)
        self.val_metrics = MetricCollection(
            {
                "auroc": MultilabelAUROC(num_labels=n, average=None),
                "f1": MultilabelF1Score(num_labels=n, average=None),
                "acc": MultilabelAccuracy(num_labels=n, average=None),
            },
            prefix="val/",
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        feats = self.dropout(self.backbone(image))
        return self.presence_head(feats), torch.sigmoid(self.box_head(feats))

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits, box = self(batch["image"])
        bce = F.binary_cross_entropy_with_logits(logits, batch["target"], pos_weight=self.pos_weight)
        mask = batch["box_mask"].float()
        box_err = F.smooth_l1_loss(box, batch["box"], reduction="none", beta=0.05).mean(dim=1)
        box_loss = (box_err * mask).sum() / mask.sum().clamp_min(1.0)
        loss = bce + self.box_loss_weight * box_loss
        return loss, logits, {"bce": bce, "box": box_loss}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, parts = self._loss(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}_loss": v for k, v in parts.items()}, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, logits, parts = self._loss(batch)
        bs = batch["image"].shape[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/box_loss", parts["box"], batch_size=bs, sync_dist=True)
        self.val_metrics.update(torch.sigmoid(logits), batch["target"].long())

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        out = {}
        for name, per_level in values.items():
            for v, x in zip(VERTEBRAE, per_level):
                out[f"{name}_{v}"] = x
            out[f"{name}_macro"] = per_level.mean()
        self.log_dict(out, sync_dist=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        logits, box = self(batch["image"])
        return {
            "visibility": torch.sigmoid(logits).float(),
            "box": box.float(),
            "study_idx": batch["study_idx"],
            "slice_index": batch["slice_index"],
        }
