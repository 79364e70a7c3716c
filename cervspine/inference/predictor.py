"""Both stages on one study at a time: load → stage 1 → spine crops → stage 2 → aggregation.

Each study's volume is windowed once and shared by its slices' 2.5D stacks (no work is repeated per
slice); batches run under ``torch.inference_mode`` and bf16 autocast where the device has it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cervspine import TARGETS, VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.data.metadata import slice_features, study_features
from cervspine.data.spine import crop_pixels, crop_track
from cervspine.data.stage1_table import BOX_COLS, COLUMNS, VIS_COLS
from cervspine.data.transforms import context_offsets, resize_hwc, resolve_windows
from cervspine.data.vertebra_crops import VertebraCropper, study_sequences
from cervspine.data.visibility import normalize_visibility
from cervspine.models.fracture import FractureClassifier, aggregate_slices
from cervspine.models.sequence import VertebraSequenceClassifier
from cervspine.models.vertebrae import VertebraeDetector
from cervspine.scoring.aggregation import DEFAULT_EPS

# stage-2 model classes by the name a checkpoint records (``model_class``); none recorded → slice model
STAGE2_CLASSES: dict[str, type] = {
    "FractureClassifier": FractureClassifier,
    "VertebraSequenceClassifier": VertebraSequenceClassifier,
}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``n`` for the block (None: left as they are)."""
    if n is None or int(n) == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_stage(ckpt_path: str | Path, cls: type | None, device: torch.device):
    """(module in eval mode on ``device``, the data hyper-parameters it was trained with).

    ``cls=None``: a stage-2 class chosen by the checkpoint's ``model_class`` (see :data:`STAGE2_CLASSES`).
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if cls is None:
        name = ckpt.get("model_class", "FractureClassifier")
        if name not in STAGE2_CLASSES:
            raise ValueError(f"{ckpt_path}: unknown stage-2 model class {name!r}")
        cls = STAGE2_CLASSES[name]
    hp = dict(ckpt["hyper_parameters"])
    backbone = {**hp["backbone"], "pretrained": False, "weights_path": None}  # weights come from the ckpt
    model = cls.load_from_checkpoint(
        ckpt_path, map_location="cpu", backbone=backbone, compile=False, weights_only=False
    )
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not data_hp:
        raise ValueError(
            f"{ckpt_path}: checkpoint has no datamodule hyper-parameters (not made by cervspine.train)"
        )
    return model.eval().to(device), data_hp


@dataclass
class StageData:
    """How a stage's inputs are built (taken from its checkpoint)."""

    offsets: np.ndarray
    windows: list[tuple[float, float]]
    input_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_hparams(cls, hp: dict[str, Any]) -> StageData:
        return cls(
            context_offsets(int(hp.get("context", 1)), int(hp.get("stride", 1))),
            resolve_windows(list(hp.get("windows", ["bone"]))),
            int(hp["input_size"]),
            hp,
        )


def windowed_volume(volume: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """(Z, H, W) HU → (Z, nW, H, W) float32 in [0, 1], computed once per study."""
    vol = np.asarray(volume, dtype=np.float32)
    out = np.empty((vol.shape[0], len(windows), *vol.shape[1:]), dtype=np.float32)
    for i, (lo, hi) in enumerate(windows):
        np.clip((vol - lo) / (hi - lo), 0.0, 1.0, out=out[:, i])
    return out


def stack_channels(win: torch.Tensor, z: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """(Z, nW, S, S) → (B, nW·K, S, S) 2.5D stacks, window-major like :func:`window_stack`."""
    idx = np.clip(z[:, None] + offsets[None, :], 0, win.shape[0] - 1)
    x = win[torch.as_tensor(idx)]  # (B, K, nW, S, S)
    return x.transpose(1, 2).reshape(len(z), -1, *win.shape[2:])


@dataclass
class StudyPrediction:
    uid: str
    probabilities: np.ndarray  # (8,) C1..C7, patient_overall
    slice_table: pd.DataFrame  # per-slice stage-1 output (the stage-1 table's schema)
    fracture_slices: np.ndarray  # slice indices scored by stage 2 (sequence model: the sampled ones)
    fracture_probs: np.ndarray  # (n, 7) per-slice fracture probabilities (sequence model: see below)
    timings: dict[str, float]
    stage2: dict[str, Any] = field(default_factory=dict)  # model-specific details for the study record

    def as_dict(self) -> dict[str, Any]:
        out = {
            "StudyInstanceUID": self.uid,
            **{t: float(p) for t, p in zip(TARGETS, self.probabilities)},
            "timings_s": self.timings,
        }
        if self.stage2:
            out["stage2"] = self.stage2
        return out


class Predictor:
    """The two trained stages, ready to score studies."""

    def __init__(
        self,
        stage1_ckpt: str | Path,
        stage2_ckpt: str | Path,
        *,
        device: str = "auto",
        batch_size: int = 64,
        precision: str = "auto",
        aggregation: dict[str, Any] | None = None,
        num_threads: int | None = None,
        channels_last: bool = False,
    ):
        """``num_threads``: torch CPU threads while scoring (None: torch's setting; on a CPU shared with
        other busy processes, 1 can be several times faster than one per core). ``channels_last``: NHWC
        convolutions (faster on CPU; the same outputs up to float rounding). ``precision="bf16"`` on CPU
        is faster still where the CPU has bf16 instructions, with probabilities ~1e-4 off (opt-in:
        "auto" means bf16 on CUDA only). experiments/benchmarks/inference.py measures each."""
        self.device = pick_device(device)
        self.batch_size, self.precision = int(batch_size), precision
        self.num_threads = num_threads
        self.stage1, hp1 = load_stage(stage1_ckpt, VertebraeDetector, self.device)
        self.data1 = StageData.from_hparams(hp1)
        self.stage2 = self.data2 = self.cropper = None
        if stage2_ckpt is not None:  # stage-1 inference alone needs no stage 2
            self.stage2, hp2 = load_stage(stage2_ckpt, None, self.device)
            self.data2 = StageData.from_hparams(hp2)
            if isinstance(self.stage2, VertebraSequenceClassifier):
                self.cropper = VertebraCropper.from_hparams(hp2)
            if hp2.get("image_size") != hp1.get("image_size"):
                raise ValueError(
                    f"stage 1 ({stage1_ckpt}) and stage 2 ({stage2_ckpt}) were trained on caches "
                    f"of different image_size: {hp1.get('image_size')} vs {hp2.get('image_size')}"
                )
        trained = dict(getattr(self.stage2, "aggregation", None) or {})
        self.aggregation = dict(aggregation or trained)
        # the checkpoint's calibration was fitted on its own aggregation's outputs
        self.calibrated = hasattr(self.stage2, "calibrate") and self.aggregation == trained
        if channels_last:
            for model in (self.stage1, self.stage2):
                if model is not None:
                    model.to(memory_format=torch.channels_last)
                    model.channels_last = True  # the modules' forward converts their input

    @property
    def image_size(self) -> int | None:
        """The cache image size the stages were trained on (studies must be cached at this size)."""
        size = self.data1.extra.get("image_size")
        return None if size is None else int(size)

    def run_stage1(self, study: CachedStudy) -> tuple[np.ndarray, np.ndarray]:
        """(visibility (Z, 7), spine boxes (Z, 4), NaN where no cervical level passes 0.5)."""
        with torch_threads(self.num_threads):
            return self._run_stage1(study)

    @torch.inference_mode()
    def _run_stage1(self, study: CachedStudy) -> tuple[np.ndarray, np.ndarray]:
        d = self.data1
        win = windowed_volume(study.volume, d.windows)
        if win.shape[2:] != (d.input_size, d.input_size):
            win = np.stack([resize_hwc(w.transpose(1, 2, 0), d.input_size).transpose(2, 0, 1) for w in win])
        win_t = torch.from_numpy(win)
        vis, boxes = [], []
        for start in range(0, study.num_slices, self.batch_size):
            z = np.arange(start, min(start + self.batch_size, study.num_slices))
            x = stack_channels(win_t, z, d.offsets).to(self.device)
            with _autocast(self.device, self.precision):
                logits, box = self.stage1(x)
            vis.append(torch.sigmoid(logits.float()).cpu().numpy())
            boxes.append(box.float().cpu().numpy())
        vis_a, box_a = np.concatenate(vis), np.concatenate(boxes)
        box_a[vis_a.max(axis=1) < 0.5] = np.nan
        return vis_a, box_a

    @torch.inference_mode()
    def run_stage2(
        self, study: CachedStudy, vis: np.ndarray, boxes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slice classifier on raw stage-1 outputs: (slice indices, (n, 7) fracture probabilities) for the
        slices that show a cervical level, and the (Z, 7) visibility normalised as stage 2 was trained
        (what aggregation weighs the slices by)."""
        vis = self._stage2_visibility(vis)
        z_all = np.flatnonzero(vis.max(axis=1) >= float(self.data2.extra.get("visible_threshold", 0.5)))
        if not len(z_all):
            return z_all, np.zeros((0, len(VERTEBRAE)), dtype=np.float32), vis
        win = windowed_volume(study.volume, self.data2.windows)  # (Z, nW, H, W), once per study
        probs = []
        for start in range(0, len(z_all), self.batch_size):
            zs = z_all[start : start + self.batch_size]
            x, m, _ = self._stage2_inputs(study, win.__getitem__, vis, boxes, zs)
            with _autocast(self.device, self.precision):
                out = self.stage2(x, m)
            probs.append(torch.sigmoid(out["fracture"].float()).cpu().numpy())
        return z_all, np.concatenate(probs), vis

    def _stage2_visibility(self, vis: np.ndarray) -> np.ndarray:
        return normalize_visibility(vis, self.data2.extra.get("visibility_norm", "none"))

    def stage2_inputs(
        self, study: CachedStudy, vis: np.ndarray, boxes: np.ndarray, zs: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
        """The slice classifier's inputs for slices ``zs`` from raw stage-1 outputs, exactly as
        :meth:`predict` builds them: (images (n, C, S, S), metadata (n, M), pixel crop boxes (y0, x0,
        y1, x1) in the cached slice). For Grad-CAM and other looks inside stage 2."""
        vis = self._stage2_visibility(vis)

        def windowed(idx: np.ndarray) -> np.ndarray:  # only the slices asked for, not the whole volume
            return windowed_volume(study.slices(idx), self.data2.windows)

        return self._stage2_inputs(study, windowed, vis, boxes, np.asarray(zs, dtype=int))

    def _stage2_inputs(
        self,
        study: CachedStudy,
        windowed: Callable[[np.ndarray], np.ndarray],
        vis: np.ndarray,
        boxes: np.ndarray,
        zs: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int, int]]]:
        """``windowed(slice indices)`` → (K, nW, H, W) windowed slices."""
        d, hp = self.data2, self.data2.extra
        crops = crop_track(
            boxes, margin=float(hp.get("crop_margin", 0.25)), min_size=float(hp.get("min_crop", 0.15))
        )
        sf = study_features(study.meta)
        h, w = study.volume.shape[1:]
        imgs, metas, pix = [], [], []
        for z in zs:
            y0, x0, y1, x1 = crop_pixels(crops[z], h, w)
            idx = np.clip(z + d.offsets, 0, study.num_slices - 1)
            patch = windowed(idx)[:, :, y0:y1, x0:x1]  # (K, nW, h', w')
            hwc = patch.transpose(1, 0, 2, 3).reshape(-1, y1 - y0, x1 - x0).transpose(1, 2, 0)
            imgs.append(resize_hwc(np.ascontiguousarray(hwc), d.input_size).transpose(2, 0, 1))
            metas.append(np.concatenate([slice_features(int(z), study.num_slices, vis[z]), sf]))
            pix.append((y0, x0, y1, x1))
        x = torch.from_numpy(np.stack(imgs)).to(self.device)
        m = torch.from_numpy(np.stack(metas).astype(np.float32)).to(self.device)
        return x, m, pix

    @torch.inference_mode()
    def run_stage2_sequence(
        self, study: CachedStudy, vis: np.ndarray, boxes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Sequence model: (8,) probabilities, (7, N) sampled slice indices (-1: vertebra not found) and
        per-vertebra details (probability, extent, slices) for the study record. Geometry comes from
        stage 1 only, as on test studies (a cached segmentation is not used)."""
        extents = self.cropper.extents_from_stage1(vis, boxes)
        images, slices, present = study_sequences(self.cropper, study.volume, extents, vis, boxes)
        if not present.any():
            raise RuntimeError(f"{study.uid}: stage 1 found no cervical vertebra on any slice")
        x = torch.from_numpy(images).to(self.device)
        with _autocast(self.device, self.precision):
            probs = self.stage2.predict_study(x, torch.from_numpy(present).to(self.device))
        details = {
            "model": "VertebraSequenceClassifier",
            "vertebrae": {
                v: {"probability": float(probs[i]), **e.as_dict(), "slices": slices[i].tolist()}
                for i, (v, e) in enumerate(zip(VERTEBRAE, extents))
            },
        }
        return probs, slices, details

    def predict(self, study: CachedStudy) -> StudyPrediction:
        with torch_threads(self.num_threads):
            return self._predict(study)

    def _predict(self, study: CachedStudy) -> StudyPrediction:
        t0 = time.perf_counter()
        vis, boxes = self._run_stage1(study)
        return self._predict_stage2(study, vis, boxes, {"stage1": time.perf_counter() - t0})

    def _predict_stage2(
        self, study: CachedStudy, vis: np.ndarray, boxes: np.ndarray, t: dict[str, float]
    ) -> StudyPrediction:
        """Stage 2 and aggregation from raw stage-1 outputs; ``t`` holds the timings so far."""
        t0 = time.perf_counter()
        if self.cropper is not None:
            return self._predict_sequence(study, vis, boxes, t, t0)
        z, probs, vis2 = self.run_stage2(study, vis, boxes)
        t["stage2"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if len(z):
            agg, _ = aggregate_slices(probs, vis2[z], np.zeros(len(z)), z, **self.aggregation)
            final = self.stage2.calibrate(agg)[0] if self.calibrated else agg[0]
        else:  # no cervical level found: the study cannot be scored
            raise RuntimeError(f"{study.uid}: stage 1 found no cervical vertebra on any slice")
        t["aggregate"] = time.perf_counter() - t0
        return StudyPrediction(study.uid, final, stage1_frame(study, vis, boxes), z, probs, t)

    def _predict_sequence(
        self, study: CachedStudy, vis: np.ndarray, boxes: np.ndarray, t: dict[str, float], t0: float
    ) -> StudyPrediction:
        """The sequence model's StudyPrediction: ``fracture_slices`` are the sampled slices (sorted,
        unique); ``fracture_probs[i, v]`` is vertebra v's probability where slice i was sampled for v,
        else 0. No slice → study aggregation happens, so ``aggregate`` is 0."""
        final, slices, details = self.run_stage2_sequence(study, vis, boxes)
        t["stage2"], t["aggregate"] = time.perf_counter() - t0, 0.0
        z = np.unique(slices[slices >= 0])
        per_slice = np.zeros((len(z), len(VERTEBRAE)), dtype=np.float32)
        for v in range(len(VERTEBRAE)):
            per_slice[np.isin(z, slices[v]), v] = final[v]
        return StudyPrediction(study.uid, final, stage1_frame(study, vis, boxes), z, per_slice, t, details)


class EnsemblePredictor:
    """Several stage-2 models over one stage 1. Each scores a study as its own :class:`Predictor` would
    (its aggregation and study calibration included); the answer is the mean of their study logits.
    Stage 1 runs once per study. What this class does not define (``stage2``, ``data2``,
    ``stage2_inputs``, … for reports and Grad-CAM) is the first member's."""

    def __init__(self, stage1_ckpt: str | Path, stage2_ckpts: Sequence[str | Path], **kwargs: Any):
        if len(stage2_ckpts) < 2:
            raise ValueError(f"an ensemble needs two or more stage-2 checkpoints, got {list(stage2_ckpts)}")
        self.checkpoints = [str(c) for c in stage2_ckpts]
        self.members = [Predictor(stage1_ckpt, c, **kwargs) for c in stage2_ckpts]

    def __getattr__(self, name: str) -> Any:
        if name == "members":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.members[0], name)

    def predict(self, study: CachedStudy) -> StudyPrediction:
        first = self.members[0]
        with torch_threads(first.num_threads):
            t0 = time.perf_counter()
            vis, boxes = first._run_stage1(study)
            t1 = time.perf_counter() - t0
            preds = [m._predict_stage2(study, vis, boxes, {"stage1": t1}) for m in self.members]
        p = np.clip(
            np.stack([x.probabilities for x in preds]).astype(np.float64), DEFAULT_EPS, 1 - DEFAULT_EPS
        )
        logits = np.log(p) - np.log1p(-p)
        probs = (1.0 / (1.0 + np.exp(-logits.mean(axis=0)))).astype(np.float32)
        timings = {"stage1": t1, **{k: sum(x.timings[k] for x in preds) for k in ("stage2", "aggregate")}}
        members = [
            {"checkpoint": c, **{t: float(v) for t, v in zip(TARGETS, x.probabilities)}}
            for c, x in zip(self.checkpoints, preds)
        ]
        details = {"model": "ensemble: mean of the members' study logits", "members": members}
        return replace(preds[0], probabilities=probs, timings=timings, stage2=details)


def load_predictor(
    stage1_ckpt: str | Path, stage2_ckpt: str | Path | Sequence[str | Path], **kwargs: Any
) -> Predictor | EnsemblePredictor:
    """A :class:`Predictor`, or an :class:`EnsemblePredictor` when ``stage2_ckpt`` lists several."""
    if isinstance(stage2_ckpt, (str, Path)):
        return Predictor(stage1_ckpt, stage2_ckpt, **kwargs)
    ckpts = list(stage2_ckpt)
    return (
        Predictor(stage1_ckpt, ckpts[0], **kwargs)
        if len(ckpts) == 1
        else EnsemblePredictor(stage1_ckpt, ckpts, **kwargs)
    )


def stage1_frame(study: CachedStudy, vis: np.ndarray, boxes: np.ndarray) -> pd.DataFrame:
    """One study's rows of the stage-1 table."""
    df = pd.DataFrame(vis, columns=VIS_COLS)
    df[BOX_COLS] = boxes
    df.insert(0, "instance_number", np.asarray(study.meta["instance_numbers"], dtype=np.int64))
    df.insert(0, "slice_index", np.arange(study.num_slices))
    df.insert(0, "StudyInstanceUID", study.uid)
    return df[COLUMNS]
