"""Stage 1 with the whole column in view: which of C1–C7 each slice shows, decided from every slice of the
study at once, and the spine's in-plane box.

A study is a sequence of L slices sampled about ``z_step_mm`` apart (see
:class:`~cervspine.data.column.ColumnSampler`): a timm CNN encodes each 2.5D slice, a bidirectional GRU
reads the L encodings (with the sampling step in mm, so the model knows the physical scale), and each
position gets 7 presence logits and a box. The level of a slice is then a matter of its place in the
column (counted from C1/C2 above or the ribs below), not of a per-level size cue a single slice carries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torchmetrics import MetricCollection
from torchmetrics.classification import MultilabelAUROC, MultilabelF1Score

from cervspine import VERTEBRAE
from cervspine.models.backbones import BackboneSpec, build_backbone, fast_backbone
from cervspine.models.optim import OptimizedModule, SchedulerFactory

N_VERT = len(VERTEBRAE)
STEP_REFERENCE_MM = 2.0  # the sampling step feature is (step − 2 mm) / 1 mm


class VertebraeColumnDetector(OptimizedModule):
    """CNN per slice → BiGRU over the study's slices → per-slice presence of C1–C7 and spine box."""

    def __init__(
        self,
        backbone: BackboneSpec,
        in_chans: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory | dict[str, Any] | None = None,
        rnn_hidden: int = 128,
        rnn_layers: int = 2,
        feature_dim: int = 128,
        dropout: float = 0.2,
        box_loss_weight: float = 1.0,
        slice_loss_weight: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.encoder = build_backbone(backbone, in_chans)
        width = self.encoder.num_features
        # CNN features → a small normalised code per slice: what the GRU reads (a stable scale to start from)
        self.project = nn.Sequential(nn.Linear(width, feature_dim), nn.LayerNorm(feature_dim), nn.GELU())
        self.rnn = nn.GRU(
            feature_dim + 1,
            rnn_hidden,
            num_layers=rnn_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if rnn_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.presence_head = nn.Linear(2 * rnn_hidden, N_VERT)
        self.box_head = nn.Linear(2 * rnn_hidden, 4)
        self.slice_head = nn.Linear(feature_dim, N_VERT) if slice_loss_weight > 0 else None
        self.box_loss_weight, self.slice_loss_weight = float(box_loss_weight), float(slice_loss_weight)
        self.optimizer_factory, self.scheduler_cfg = optimizer, scheduler
        self.channels_last = channels_last
        self.encoder = fast_backbone(self.encoder, channels_last=channels_last, compile=compile)
        metrics = {
            "auroc": MultilabelAUROC(N_VERT, average=None),
            "f1": MultilabelF1Score(N_VERT, average=None),
        }
        self.val_metrics = MetricCollection(metrics, prefix="val/")

    # ---- model -------------------------------------------------------------------------------------
    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) 2.5D slices → (N, feature_dim) codes (the part inference may batch freely)."""
        if self.channels_last:
            slices = slices.contiguous(memory_format=torch.channels_last)
        return self.project(self.encoder(slices).float())

    def read_column(
        self, feats: torch.Tensor, lengths: torch.Tensor, step_mm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, F) encodings of sequences of ``lengths`` sampled ``step_mm`` (B,) apart → presence logits
        (B, L, 7) and boxes (B, L, 4) in [0, 1] (padding positions: undefined)."""
        b, n = feats.shape[:2]
        step = ((step_mm.float() - STEP_REFERENCE_MM) / 1.0).view(b, 1, 1).expand(b, n, 1)
        x = torch.cat([feats.float(), step.to(feats.device)], dim=-1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        seq, _ = pad_packed_sequence(out, batch_first=True, total_length=n)
        seq = self.dropout(seq)
        return self.presence_head(seq), torch.sigmoid(self.box_head(seq))

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, step_mm: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``image`` (B, L, C, S, S), ``mask`` (B, L) True at real positions (a padded batch)."""
        b, n = mask.shape
        valid = mask.bool()
        flat = self.encode(image[valid])  # only the real slices go through the CNN
        feats = flat.new_zeros(b, n, flat.shape[-1])
        feats[valid] = flat
        presence, box = self.read_column(feats, valid.sum(dim=1), step_mm)
        out = {"presence": presence, "box": box}
        if self.slice_head is not None:
            out["slice"] = self.slice_head(self.dropout(feats))
        return out

    # ---- training ----------------------------------------------------------------------------------
    def _loss(
        self, batch: dict, out: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        valid = batch["mask"].bool()
        target = batch["target"][valid]
        bce = F.binary_cross_entropy_with_logits(out["presence"][valid].float(), target)
        box_mask = (batch["box_mask"] * batch["mask"]).float()
        err = F.smooth_l1_loss(out["box"].float(), batch["box"], reduction="none", beta=0.05).mean(dim=-1)
        box_loss = (err * box_mask).sum() / box_mask.sum().clamp_min(1.0)
        loss = bce + self.box_loss_weight * box_loss
        parts = {"bce": bce, "box": box_loss}
        if "slice" in out:
            slice_bce = F.binary_cross_entropy_with_logits(out["slice"][valid].float(), target)
            loss = loss + self.slice_loss_weight * slice_bce
            parts["slice"] = slice_bce
        return loss, parts

    def _batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return self(batch["image"], batch["mask"], batch["step_mm"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, parts = self._loss(batch, self._batch(batch))
        n = int(batch["mask"].sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}_loss": v for k, v in parts.items()}, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._batch(batch)
        loss, parts = self._loss(batch, out)
        n = int(batch["mask"].sum())
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val/box_loss", parts["box"], batch_size=n, sync_dist=True)
        valid = batch["mask"].bool()
        self.val_metrics.update(torch.sigmoid(out["presence"][valid].float()), batch["target"][valid].long())

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        out = {}
        for name, per_level in values.items():
            for v, x in zip(VERTEBRAE, per_level):
                out[f"{name}_{v}"] = x
            out[f"{name}_macro"] = per_level.mean()
        self.log_dict(out, sync_dist=True)
