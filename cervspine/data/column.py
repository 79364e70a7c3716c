"""Stage 1 with the whole column in view: a study as one sequence of slices (for
:class:`~cervspine.models.column.VertebraeColumnDetector`).

:class:`ColumnSampler` takes every k-th slice, k = round(``z_step_mm`` / slice spacing) (at least 1), so
neighbouring positions are about ``z_step_mm`` apart whatever the slice thickness; each position is a
2.5D stack of ``context`` neighbours one step apart, windowed and resized to ``input_size``. Training
draws a random offset and a random contiguous part of the column (at least ``min_fraction`` of it), so
the model cannot learn where a scan starts or ends; validation and inference read the whole study.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from cervspine.cache import CachedStudy
from cervspine.data.column_sampler import ColumnSampler, spacing_mm
from cervspine.data.datamodules import RsnaDataModule
from cervspine.data.transforms import build_augment


class VertebraeColumnDataset(Dataset):
    """Items: one study's column, ``image`` (L, C, S, S), ``target`` (L, 7) presence, ``box`` (L, 4)
    normalised (y0, x0, y1, x1) with ``box_mask`` (L,), ``step_mm``, ``slices`` (L,) and ``study_idx``."""

    def __init__(
        self,
        studies: Sequence[CachedStudy],
        presence: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray],
        sampler: ColumnSampler,
        *,
        train: bool = False,
        min_fraction: float = 0.5,
        z_step_jitter: float = 1.0,
        augment: A.Compose | None = None,
    ):
        if z_step_jitter < 1.0:
            raise ValueError(f"z_step_jitter must be ≥ 1 (a factor), got {z_step_jitter}")
        self.studies, self.presence, self.boxes = list(studies), list(presence), list(boxes)
        self.sampler, self.train, self.min_fraction, self.augment = (
            sampler,
            train,
            float(min_fraction),
            augment,
        )
        self.z_step_jitter = float(z_step_jitter)

    def __len__(self) -> int:
        return len(self.studies)

    def _positions(self, study: CachedStudy) -> tuple[np.ndarray, ColumnSampler]:
        """The positions read and the sampler that reads them (training: a random step, offset and part)."""
        dz, n = spacing_mm(study), study.num_slices
        if not self.train:
            idx = self.sampler.positions(n, dz)
            return idx[: self.sampler.max_positions], self.sampler
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        sampler = self.sampler
        if self.z_step_jitter > 1.0:  # levels span varying position counts (the step is an input)
            scale = float(np.exp(rng.uniform(-1.0, 1.0) * np.log(self.z_step_jitter)))
            sampler = replace(sampler, z_step_mm=sampler.z_step_mm * scale)
        idx = sampler.positions(n, dz, int(rng.integers(sampler.stride(dz))))
        lo = max(2, int(np.ceil(self.min_fraction * len(idx))))
        length = min(int(rng.integers(min(lo, len(idx)), len(idx) + 1)), self.sampler.max_positions)
        start = int(rng.integers(0, len(idx) - length + 1))
        return idx[start : start + length], sampler

    def _augment(self, image: np.ndarray, box: np.ndarray, has_box: np.ndarray) -> tuple[np.ndarray, ...]:
        """One random transform for every position (albumentations' ``images`` target), the boxes moved
        with it."""
        keep = np.flatnonzero(has_box)
        bxs = [[box[i, 1], box[i, 0], box[i, 3], box[i, 2]] for i in keep]  # albumentations: x, y order
        images = np.ascontiguousarray(image.transpose(0, 2, 3, 1))  # (L, S, S, C)
        out = self.augment(images=images, bboxes=bxs, box_labels=[int(i) for i in keep])
        image = np.asarray(out["images"], dtype=np.float32).transpose(0, 3, 1, 2)
        box, has_box = np.zeros_like(box), np.zeros_like(has_box)
        for (x0, y0, x1, y1), i in zip(out["bboxes"], out["box_labels"]):
            box[int(i)], has_box[int(i)] = (y0, x0, y1, x1), True
        return image, box, has_box

    def __getitem__(self, i: int) -> dict:
        study = self.studies[i]
        idx, sampler = self._positions(study)
        image = sampler.inputs(study.volume, idx, spacing_mm(study))
        box = np.asarray(self.boxes[i][idx], dtype=np.float32)
        has_box = np.isfinite(box).all(axis=1)
        box = np.nan_to_num(box, nan=0.0)
        if self.augment is not None:
            image, box, has_box = self._augment(image, box, has_box)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(np.asarray(self.presence[i][idx], dtype=np.float32)),
            "box": torch.from_numpy(box.astype(np.float32)),
            "box_mask": torch.from_numpy(has_box.astype(np.float32)),
            "step_mm": float(sampler.stride(spacing_mm(study)) * spacing_mm(study)),
            "slices": torch.from_numpy(idx.astype(np.int64)),
            "study_idx": int(i),
        }


def collate_columns(items: list[dict]) -> dict:
    """Columns of different lengths → one batch padded to the longest, with ``mask`` (B, L)."""
    n = max(len(it["slices"]) for it in items)
    out: dict[str, Any] = {"mask": torch.zeros(len(items), n, dtype=torch.bool)}
    for key in ("image", "target", "box", "box_mask", "slices"):
        first = items[0][key]
        batch = first.new_zeros((len(items), n, *first.shape[1:]))
        for b, it in enumerate(items):
            batch[b, : len(it[key])] = it[key]
        out[key] = batch
    for b, it in enumerate(items):
        out["mask"][b, : len(it["slices"])] = True
    out["step_mm"] = torch.tensor([it["step_mm"] for it in items], dtype=torch.float32)
    out["study_idx"] = torch.tensor([it["study_idx"] for it in items], dtype=torch.long)
    return out


class VertebraeColumnDataModule(RsnaDataModule):
    """Stage 1 with the column in view: the segmented training studies as slice sequences.

    ``epoch_size``: columns drawn (with replacement) per training epoch, each a new random part of a
    study (None: one per training study); ``min_fraction``: the shortest part of a column drawn;
    ``z_step_jitter``: training columns are sampled ``z_step_mm`` × a log-uniform factor in
    [1/jitter, jitter] apart (1: always ``z_step_mm``); the model is told each step, so it learns a level's
    extent in mm rather than as a count of positions. ``read_offsets``: what inference averages
    (:class:`ColumnSampler`; kept in the checkpoint's hyper-parameters, not used in training).
    """

    def __init__(
        self,
        *args,
        z_step_mm: float = ColumnSampler.z_step_mm,
        max_positions: int = ColumnSampler.max_positions,
        read_offsets: int = ColumnSampler.read_offsets,
        min_fraction: float = 0.5,
        z_step_jitter: float = 1.0,
        epoch_size: int | None = None,
        val_batch_size: int = 2,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["augment"], logger=False)
        self.sampler = ColumnSampler.from_hparams(dict(self.hparams))
        self.min_fraction, self.epoch_size = float(min_fraction), epoch_size
        self.z_step_jitter = float(z_step_jitter)
        self.val_batch_size = int(val_batch_size)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        seg_uids = sorted(u for u in self.index.uids_with_segmentation if u in set(self.index.train_uids))
        self.assign_split(seg_uids, "a segmentation (stage 1 learns from them)")

    def dataset(self, uids: Sequence[str], *, train: bool = False) -> VertebraeColumnDataset:
        studies = [self.study(u) for u in uids]
        presence = [s.vertebra_presence(self.presence_threshold, self.presence_unit) for s in studies]
        if any(p is None for p in presence):
            raise RuntimeError("column dataset: every study needs a segmentation in the cache")
        augment = build_augment(self.augment_transforms, with_boxes=True) if train else None
        return VertebraeColumnDataset(
            studies,
            presence,
            [s.spine_box for s in studies],
            self.sampler,
            train=train,
            min_fraction=self.min_fraction,
            z_step_jitter=self.z_step_jitter,  # the dataset applies it to training columns only
            augment=augment,
        )

    def images_per_sample(self, uids: Sequence[str], *, train: bool) -> int:
        """The longest column of ``uids``: every position at the smallest step (training's jitter)."""
        sampler = (
            replace(self.sampler, z_step_mm=self.sampler.z_step_mm / self.z_step_jitter)
            if train
            else self.sampler
        )
        counts = [len(sampler.positions(s.num_slices, spacing_mm(s))) for s in map(self.study, uids)]
        return min(max(counts, default=1), self.sampler.max_positions)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(self.train_uids, train=True)
        sampler = (
            RandomSampler(ds, replacement=True, num_samples=int(self.epoch_size)) if self.epoch_size else None
        )
        return self._loader(ds, train=True, sampler=sampler, collate_fn=collate_columns)

    def val_dataloader(self) -> DataLoader:
        ds = self.dataset(self.val_uids)
        return self._loader(ds, train=False, collate_fn=collate_columns, batch_size=self.val_batch_size)
