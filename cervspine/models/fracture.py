"""Stage 2: per-slice fracture classifier (timm image branch + metadata MLP), scored per study."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import CatMetric

from cervspine import VERTEBRAE
from cervspine.models.backbones import BackboneSpec, build_backbone, fast_backbone
from cervspine.models.losses import competition_loss
from cervspine.models.optim import OptimizedModule, SchedulerFactory
from cervspine.models.study_validation import StudyValidation
from cervspine.scoring.aggregation import DEFAULT_EPS, aggregate_slices
from cervspine.scoring.calibration import (
    IDENTITY,
    NO_SHRINK,
    StudyCalibration,
    calibrate_study,
    coherent_overall,
    cross_fitted,
    shrink,
    shrink_weights,
)
from cervspine.scoring.competition import RSNA_PREVALENCE
from cervspine.scoring.metrics import classification_report
from cervspine.scoring.table import StudyPredictions


class MetadataFusion(nn.Module):
    """Image features + metadata MLP, fused by concatenation or by gating the image features."""

    def __init__(self, image_dim: int, meta_dim: int, hidden: int = 64, mode: str = "concat"):
        super().__init__()
        if mode not in ("concat", "gate"):
            raise ValueError(f"fusion mode must be 'concat' or 'gate', got {mode!r}")
        self.mode = mode
        self.meta_mlp = nn.Sequential(
            nn.Linear(meta_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.gate = nn.Linear(hidden, image_dim) if mode == "gate" else None
        self.out_dim = image_dim + hidden

    def forward(self, img: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        m = self.meta_mlp(meta)
        if self.gate is not None:
            img = img * torch.sigmoid(self.gate(m))
        return torch.cat([img, m], dim=1)


class FractureClassifier(StudyValidation, OptimizedModule):
    """7 per-slice vertebra fracture logits (+ an 'any fracture' logit, + an optional visibility head)."""

    # fitted or set, not learned: weight averaging copies them as they are
    pinned_buffers = ("study_calibration", "calibration_shrink", "prior")

    def __init__(
        self,
        backbone: BackboneSpec,
        in_chans: int,
        num_meta: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory | dict[str, Any] | None = None,
        fusion: str = "concat",
        meta_hidden: int = 64,
        use_metadata: bool = True,
        dropout: float = 0.2,
        overall_loss: bool = True,
        aux_vertebra_weight: float = 0.0,
        focal_gamma: float = 0.0,
        aggregation: dict[str, Any] | None = None,
        calibration: bool = True,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.backbone = build_backbone(backbone, in_chans)
        self.use_metadata = use_metadata
        width = self.backbone.num_features
        self.fusion = MetadataFusion(width, num_meta, meta_hidden, fusion) if use_metadata else None
        feat_dim = self.fusion.out_dim if use_metadata else width
        self.dropout = nn.Dropout(dropout)
        self.fracture_head = nn.Linear(feat_dim, len(VERTEBRAE))
        self.overall_head = nn.Linear(feat_dim, 1) if overall_loss else None
        self.vertebra_head = nn.Linear(feat_dim, len(VERTEBRAE)) if aux_vertebra_weight > 0 else None
        self.aux_vertebra_weight, self.focal_gamma = aux_vertebra_weight, focal_gamma
        self.aggregation = dict(aggregation or {"method": "topk_mean", "overall": "max"})
        # study-level Platt scaling fitted on each validation epoch; saved with the weights
        self.calibration = bool(calibration)
        self.register_buffer("study_calibration", torch.tensor(IDENTITY, dtype=torch.float32))
        # how far calibrated probabilities are pulled toward the training prior (small/uninformative folds)
        self.register_buffer("calibration_shrink", torch.tensor(NO_SHRINK, dtype=torch.float32))
        self.register_buffer("prior", torch.tensor(RSNA_PREVALENCE, dtype=torch.float32))
        self.optimizer_factory, self.scheduler_cfg = optimizer, scheduler
        self.channels_last = channels_last
        self.backbone = fast_backbone(self.backbone, channels_last=channels_last, compile=compile)
        self.val_probs, self.val_vis = CatMetric(), CatMetric()
        self.val_study, self.val_slice = CatMetric(), CatMetric()

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(image)
        if self.fusion is not None:
            feats = self.fusion(feats, meta)
        feats = self.dropout(feats)
        out = {"fracture": self.fracture_head(feats)}
        if self.overall_head is not None:
            out["overall"] = self.overall_head(feats).squeeze(1)
        if self.vertebra_head is not None:
            out["vertebra"] = self.vertebra_head(feats)
        return out

    def _loss(self, batch: dict, out: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = competition_loss(
            out["fracture"], batch["target"], batch.get("weight"), out.get("overall"), self.focal_gamma
        )
        if "vertebra" in out and "visibility" in batch:
            vis_t = (batch["visibility"] >= 0.5).float()
            loss = loss + self.aux_vertebra_weight * F.binary_cross_entropy_with_logits(
                out["vertebra"], vis_t
            )
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, self(batch["image"], batch.get("meta")))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch["image"], batch.get("meta"))
        bs = batch["image"].shape[0]
        self.log("val/loss", self._loss(batch, out), batch_size=bs, sync_dist=True)
        self.val_probs.update(torch.sigmoid(out["fracture"].float()))
        self.val_vis.update(batch["visibility"].float())
        self.val_study.update(batch["study_idx"].float())
        self.val_slice.update(batch["slice_index"].float())

    def on_validation_epoch_end(self) -> None:
        metrics = (self.val_probs, self.val_vis, self.val_study, self.val_slice)
        probs, vis, study, sl = (m.compute().cpu().numpy() for m in metrics)  # host arrays (CUDA runs too)
        for m in metrics:
            m.reset()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not len(study) or self.trainer.sanity_checking:
            return
        raw, seen = aggregate_slices(probs, vis, study, sl, **self.aggregation)
        uids = [dm.val_uids[i] for i in seen]
        y = dm.labels(uids)
        if not self.calibration:
            self.log_study_validation(StudyPredictions(uids, raw, y))
            return
        # the logged score: each study calibrated by a fit on the fold's other studies (and pulled toward
        # the prior as far as the fold warrants); the saved calibration: fitted on the whole fold, for
        # inference on other studies
        prior = self.training_prior()
        weights = shrink_weights(y, raw)
        preds = shrink(cross_fitted(y, raw), prior, weights)
        preds = np.clip(coherent_overall(preds), DEFAULT_EPS, 1 - DEFAULT_EPS)
        fitted = StudyCalibration.fit(y, raw).params
        self.study_calibration.copy_(torch.tensor(fitted, dtype=torch.float32))
        self.calibration_shrink.copy_(torch.tensor(weights, dtype=torch.float32))
        uncalibrated = classification_report(y, raw)["rsna_score"]
        self.log_study_validation(
            StudyPredictions(uids, preds, y), {"val/rsna_score_uncalibrated": uncalibrated}
        )

    def on_fit_start(self) -> None:
        self.set_training_prior()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints from before the prior fallback lack its buffers: the defaults (no shrink, RSNA
        prevalences) keep their answers as they were."""
        state = checkpoint.get("state_dict", {})
        for name in ("calibration_shrink", "prior"):
            state.setdefault(name, getattr(self, name).detach().clone())

    def calibrate(self, study_probs: np.ndarray) -> np.ndarray:
        """(n, 8) aggregated study probabilities → calibrated ones (identity before any validation), pulled
        toward the training prior by the fold's shrink weights."""
        params, weights = tuple(self.study_calibration.tolist()), tuple(self.calibration_shrink.tolist())
        return calibrate_study(study_probs, params, weights, self.training_prior())

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self(batch["image"], batch.get("meta"))
        return {
            "fracture": torch.sigmoid(out["fracture"].float()),
            "visibility": batch["visibility"],
            "study_idx": batch["study_idx"],
            "slice_index": batch["slice_index"],
        }
