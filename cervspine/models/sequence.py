"""Stage 2, per-vertebra sequences: timm CNN per slice → bidirectional GRU/LSTM → attention pooling.

Input ``image`` (B, V, N, C, S, S): B samples of V vertebra sequences of N 2.5D crops. Each sequence
gives one fracture logit. With V = 7 (one study per sample) an optional study head gives
patient_overall as a learned correction of the noisy-or: ``logit(1 − Π(1 − p_v)) + head(pooled)``,
the head initialised to zero, so training starts from the noisy-or and only learns what it adds.
Vertebrae flagged absent (never visible) get the training-set prior instead of the model's output.
``encoder_init`` starts the CNN from a trained slice classifier (its ``backbone.*`` weights), the
two-step training of several top solutions; ``pos_fraction`` oversampling in the data is undone at
evaluation by a logit shift (``logit_shift``, set at fit start).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torchmetrics import CatMetric

from cervspine import VERTEBRAE
from cervspine.models.backbones import BackboneSpec, build_backbone, fast_backbone
from cervspine.models.losses import weighted_bce
from cervspine.models.optim import OptimizedModule, SchedulerFactory
from cervspine.models.study_validation import StudyValidation
from cervspine.scoring.aggregation import sequence_study, vertebra_rows
from cervspine.scoring.competition import OVERALL_WEIGHTS, PROBABILITY_EPS, RSNA_PREVALENCE, VERTEBRA_WEIGHTS
from cervspine.scoring.table import StudyPredictions

N_VERT = len(VERTEBRAE)
EPS = PROBABILITY_EPS


class AttentionPool(nn.Module):
    """Softmax-attention weighted mean over a sequence, ignoring masked-out positions."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.score(x).squeeze(-1)  # (B, L)
        if mask is not None:
            a = a.masked_fill(~mask, torch.finfo(a.dtype).min)
        w = torch.softmax(a.float(), dim=-1).to(x.dtype)
        return (w.unsqueeze(-1) * x).sum(dim=1), w


class VertebraSequenceClassifier(StudyValidation, OptimizedModule):
    """One fracture logit per vertebra sequence (+ patient_overall from the 7 when ``study_head``)."""

    pinned_buffers = ("prior", "logit_shift")  # set, not learned: weight averaging copies them as is

    def __init__(
        self,
        backbone: BackboneSpec,
        in_chans: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory | dict[str, Any] | None = None,
        rnn: str = "gru",
        rnn_hidden: int = 128,
        rnn_layers: int = 1,
        pooling: str = "attention",
        vertebra_embedding: bool = True,
        study_head: bool = True,
        slice_loss_weight: float = 0.0,
        encoder_init: str | None = None,
        dropout: float = 0.2,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if rnn not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got {rnn!r}")
        if pooling not in ("attention", "mean", "max"):
            raise ValueError(f"pooling must be 'attention', 'mean' or 'max', got {pooling!r}")
        self.encoder = build_backbone(backbone, in_chans)
        width = self.encoder.num_features
        self.vertebra_emb = nn.Embedding(N_VERT, width) if vertebra_embedding else None
        rnn_cls = nn.GRU if rnn == "gru" else nn.LSTM
        self.rnn = rnn_cls(
            width,
            rnn_hidden,
            num_layers=rnn_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if rnn_layers > 1 else 0.0,
        )
        dim = 2 * rnn_hidden
        self.pooling = pooling
        self.pool = AttentionPool(dim) if pooling == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, 1)
        nn.init.constant_(self.head.bias, float(np.log(0.1 / 0.9)))  # start near a vertebra's prevalence
        self.slice_head = nn.Linear(dim, 1) if slice_loss_weight > 0 else None
        self.slice_loss_weight = float(slice_loss_weight)
        self.study_pool = AttentionPool(dim) if study_head else None
        self.study_head = nn.Linear(dim, 1) if study_head else None
        if self.study_head is not None:
            nn.init.zeros_(self.study_head.weight)
            nn.init.zeros_(self.study_head.bias)
        self.register_buffer("prior", torch.tensor(RSNA_PREVALENCE, dtype=torch.float32))
        # (vertebra, overall) logit offsets of oversampled training, removed at evaluation
        self.register_buffer("logit_shift", torch.zeros(2))
        self.optimizer_factory, self.scheduler_cfg = optimizer, scheduler
        self.encoder_init = encoder_init
        self.channels_last = channels_last
        self.encoder = fast_backbone(self.encoder, channels_last=channels_last, compile=compile)
        self.val_probs, self.val_present, self.val_vert = CatMetric(), CatMetric(), CatMetric()
        self.val_study, self.val_overall = CatMetric(), CatMetric()

    # ---- model -------------------------------------------------------------------------------------
    def forward(
        self, image: torch.Tensor, vertebra: torch.Tensor, present: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``vertebra`` (B, V) level indices, ``present`` (B, V) → ``vertebra`` logits (B, V) and, with the
        study head and V = 7, ``overall`` logits (B,)."""
        b, v, n = image.shape[:3]
        x = image.flatten(0, 2)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.encoder(x).view(b * v, n, -1)
        if self.vertebra_emb is not None:
            feats = feats + self.vertebra_emb(vertebra.reshape(-1)).unsqueeze(1).to(feats.dtype)
        seq, _ = self.rnn(feats)
        if self.pool is not None:
            pooled, _ = self.pool(seq)
        elif self.pooling == "mean":
            pooled = seq.mean(dim=1)
        else:
            pooled = seq.amax(dim=1)
        pooled = self.dropout(pooled)
        out = {"vertebra": self.head(pooled).view(b, v)}
        if self.slice_head is not None:
            out["slice"] = self.slice_head(self.dropout(seq)).view(b, v, n)
        if self.study_head is not None and v == N_VERT:
            real = torch.ones(b, v, dtype=torch.bool, device=image.device) if present is None else present > 0
            mask = real | ~real.any(dim=1, keepdim=True)  # a study without any vertebra: attend to all
            emb, _ = self.study_pool(pooled.view(b, v, -1), mask)
            p = torch.where(real, torch.sigmoid(out["vertebra"].float()), self.prior[:N_VERT])
            noisy_or = (1 - torch.prod(1 - p, dim=1)).clamp(EPS, 1 - EPS)
            out["overall"] = torch.logit(noisy_or) + self.study_head(emb).squeeze(1).float()
        return out

    def _loss(self, batch: dict, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ w·BCE / Σ w with the competition's weights; absent vertebrae carry no weight. With
        ``slice_loss_weight`` > 0, plus that times the same loss of per-slice logits (deep supervision:
        every sampled slice of a vertebra gets the vertebra's label)."""
        present = batch["present"].float()
        num, den = weighted_bce(out["vertebra"].float(), batch["target"], VERTEBRA_WEIGHTS, present)
        if "overall" in out:
            n2, d2 = weighted_bce(out["overall"], batch["overall_target"], OVERALL_WEIGHTS)
            num, den = num + n2, den + d2
        loss = num / den.clamp_min(1e-8)
        if "slice" in out:
            n = out["slice"].shape[-1]
            target = batch["target"].unsqueeze(-1).expand(-1, -1, n)
            weight = present.unsqueeze(-1).expand(-1, -1, n)
            n3, d3 = weighted_bce(out["slice"].float(), target, VERTEBRA_WEIGHTS, weight)
            loss = loss + self.slice_loss_weight * n3 / d3.clamp_min(1e-8)
        return loss

    def _forward_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return self(batch["image"], batch["vertebra"], batch["present"])

    # ---- training ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before a fresh fit (a resumed one then restores its own weights over these)."""
        if stage == "fit" and self.encoder_init:
            load_encoder(self.encoder, self.encoder_init)

    def on_fit_start(self) -> None:
        self.set_training_prior()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "sampling_logit_shift"):
            self.logit_shift.copy_(torch.as_tensor(dm.sampling_logit_shift(), dtype=torch.float32))

    def _probs(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Calibrated probabilities: vertebra (B, V) and overall (B,) or None."""
        p = torch.sigmoid(out["vertebra"].float() - self.logit_shift[0])
        o = torch.sigmoid(out["overall"].float() - self.logit_shift[1]) if "overall" in out else None
        return p, o

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch, self._forward_batch(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._forward_batch(batch)
        b, v = batch["present"].shape
        self.log("val/loss", self._loss(batch, out), batch_size=b, sync_dist=True)
        probs, overall = self._probs(out)
        self.val_probs.update(probs.flatten())
        self.val_present.update(batch["present"].float().flatten())
        self.val_vert.update(batch["vertebra"].float().flatten())
        self.val_study.update(batch["study_idx"].float().repeat_interleave(v))
        if overall is not None:
            self.val_overall.update(overall.repeat_interleave(v))

    def on_validation_epoch_end(self) -> None:
        metrics = (self.val_probs, self.val_present, self.val_vert, self.val_study, self.val_overall)
        has_overall = bool(self.val_overall.update_called)
        # atleast_1d: CatMetric gives a 0-d tensor for a single value (one validation vertebra)
        probs, present, vert, study = (np.atleast_1d(m.compute().cpu().numpy()) for m in metrics[:4])
        overall = np.atleast_1d(self.val_overall.compute().cpu().numpy()) if has_overall else None
        for m in metrics:
            m.reset()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not len(study) or self.trainer.sanity_checking:
            return
        preds, seen = vertebra_rows(probs, present, vert, study, self.prior.cpu().numpy(), overall)
        uids = [dm.val_uids[i] for i in seen]
        self.log_study_validation(StudyPredictions(uids, preds, dm.labels(uids)))

    # ---- inference ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_study(self, image: torch.Tensor, present: torch.Tensor) -> np.ndarray:
        """(7, N, C, S, S) sequences and (7,) presence of one study → (8,) C1..C7, patient_overall."""
        vertebra = torch.arange(N_VERT, device=image.device).unsqueeze(0)
        p, o = self._probs(self(image.unsqueeze(0), vertebra, present.unsqueeze(0)))
        overall = None if o is None else o.cpu().numpy()
        return sequence_study(p[0].cpu().numpy(), present.cpu().numpy(), self.prior.cpu().numpy(), overall)


def load_encoder(encoder: nn.Module, path: str) -> None:
    """Initialise ``encoder`` from a checkpoint's ``backbone.*`` (a FractureClassifier: the slice model's
    trained CNN) or ``encoder.*`` (another sequence model) weights; the timm name and in_chans must match."""
    from cervspine.models.safe_load import load_checkpoint

    state = load_checkpoint(path)
    state = state.get("state_dict", state)
    for prefix in ("backbone.", "encoder."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            target = getattr(encoder, "_orig_mod", encoder)  # through torch.compile
            try:
                target.load_state_dict(sub)
            except RuntimeError as e:
                raise ValueError(f"{path}: its {prefix[:-1]} does not fit this encoder: {e}") from e
            return
    raise ValueError(f"{path}: no backbone.* or encoder.* weights to initialise the encoder from")
