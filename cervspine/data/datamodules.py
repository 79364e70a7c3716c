"""LightningDataModules of the two stages, reading the preprocessed cache."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from cervspine import TARGETS, VERTEBRAE
from cervspine.cache import CachedStudy, CacheParams
from cervspine.cache.params import HU_MIN, check_windows_above_floor
from cervspine.data.datasets import FractureSliceDataset, VertebraeSliceDataset
from cervspine.data.folds import assign_folds
from cervspine.data.metadata import NUM_FEATURES, slice_features, study_features
from cervspine.data.slice_crops import SliceCropSpec
from cervspine.data.stage1_table import read_stage1
from cervspine.data.transforms import StackSpec, build_augment, context_offsets, resolve_windows
from cervspine.io.rsna import RsnaIndex, is_synthetic

log = logging.getLogger(__name__)


class RsnaDataModule(L.LightningDataModule):
    """Shared part: the folder index, the cache (built in ``prepare_data`` when missing), folds, loaders."""

    def __init__(
        self,
        root: str,
        cache_dir: str,
        image_size: int | None = 256,
        segmentation_method: str = "auto",
        cache_compression: str = "none",
        cache_max_error_hu: int = 0,
        cache_hu_floor: int | None = None,
        exclude: Sequence[str] = (),
        fold: int = 0,
        n_folds: int = 5,
        fold_seed: int = 42,
        input_size: int = StackSpec.input_size,
        context: int = StackSpec.context,
        stride: int = StackSpec.stride,
        windows: Sequence = StackSpec.windows,
        augment: Sequence | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        preprocess_workers: int = 2,
        presence_threshold: float = 0.1,
        presence_unit: str = "fraction",
    ):
        super().__init__()
        self.root, self.cache_dir = Path(root), Path(cache_dir)
        self.cache_params = CacheParams(
            image_size=image_size,
            segmentation_method=segmentation_method,
            compression=cache_compression,
            max_error_hu=int(cache_max_error_hu),
            hu_floor=HU_MIN if cache_hu_floor is None else int(cache_hu_floor),
        )
        self.exclude = tuple(exclude or ())
        self.fold, self.n_folds, self.fold_seed = int(fold), int(n_folds), int(fold_seed)
        self.input_size = int(input_size)
        self.offsets = context_offsets(int(context), int(stride))
        self.windows = resolve_windows(list(windows))
        check_windows_above_floor(self.windows, self.cache_params.hu_floor)
        self.augment_transforms = list(augment or [])
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.preprocess_workers = int(preprocess_workers)
        self.presence_threshold, self.presence_unit = float(presence_threshold), presence_unit
        self._index: RsnaIndex | None = None
        self._studies: dict[str, CachedStudy] = {}

    @property
    def in_chans(self) -> int:
        return len(self.offsets) * len(self.windows)

    @property
    def index(self) -> RsnaIndex:
        if self._index is None:
            self._index = RsnaIndex.from_root(self.root, exclude=self.exclude)
        return self._index

    def prepare_data(self) -> None:
        from cervspine.cache import preprocess

        report = preprocess(
            self.index, self.cache_dir, self.cache_params, workers=self.preprocess_workers, progress=False
        )
        if not report.ok:
            raise RuntimeError(f"preprocessing failed for {len(report.failed)} studies: {report.failed}")

    def setup(self, stage: str | None = None) -> None:
        """Records in the hyper-parameters (so in every checkpoint) whether the training folder was
        generated: the checkpoint stays labelled SYNTHETIC after the folder is gone."""
        self.hparams["synthetic"] = is_synthetic(self.root)

    def study(self, uid: str) -> CachedStudy:
        if uid not in self._studies:
            self._studies[uid] = CachedStudy(self.cache_dir / uid)
        return self._studies[uid]

    def folds(self) -> pd.Series:
        return assign_folds(self.index.labels, self.n_folds, self.fold_seed)

    def split(self, uids: Sequence[str]) -> tuple[list[str], list[str]]:
        """(train, val) uids of ``uids`` for ``self.fold``."""
        folds = self.folds()
        train = [u for u in uids if folds[u] != self.fold]
        val = [u for u in uids if folds[u] == self.fold]
        return train, val

    def labels(self, uids: Sequence[str]) -> np.ndarray:
        """(n, 8) study labels C1..C7, patient_overall."""
        return self.index.labels.loc[list(uids), list(TARGETS)].to_numpy(np.float32)

    def has_geometry(self, uid: str) -> bool:
        """Whether stage 2 can place the vertebrae of ``uid`` (stage-1 predictions or a segmentation)."""
        return True

    def images_per_sample(self, uids: Sequence[str], *, train: bool) -> int:
        """The most 2-D images the backbone sees for one sample of ``uids`` (what a training step's memory
        scales with: :mod:`cervspine.training.memory`): one slice stack for the slice stages."""
        return 1

    def usable(self, uids: Sequence[str]) -> list[str]:
        """``uids`` that :meth:`has_geometry`, with a warning naming how many are skipped."""
        ok = [u for u in uids if self.has_geometry(u)]
        if len(ok) < len(uids):
            log.warning(
                "%d of %d studies have neither stage-1 predictions nor a segmentation; skipped",
                len(uids) - len(ok),
                len(uids),
            )
        return ok

    def assign_split(self, uids: Sequence[str], having: str) -> None:
        """``train_uids``/``val_uids``: this fold's split of ``uids`` (the training studies ``having``
        what the stage needs); refuses an empty set or an empty side."""
        if not uids:
            raise RuntimeError(f"{self.root}: no training study has {having}")
        self.train_uids, self.val_uids = self.split(uids)
        if not self.train_uids or not self.val_uids:
            raise RuntimeError(
                f"fold {self.fold}/{self.n_folds}: {len(self.train_uids)} train and {len(self.val_uids)} "
                f"validation studies with {having}; need at least one of each"
            )

    def split_usable(self) -> None:
        """``train_uids``/``val_uids``: this fold's split of the usable training studies (both non-empty)."""
        self.assign_split(self.usable(sorted(self.index.train_uids)), "stage-1 predictions or a segmentation")

    def _loader(self, dataset, *, train: bool, sampler=None, collate_fn=None, batch_size=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            collate_fn=collate_fn,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train and len(dataset) > (batch_size or self.batch_size),
        )


class VertebraeDataModule(RsnaDataModule):
    """Stage 1: every slice of the segmented studies; targets C1..C7 presence + spine box."""

    def __init__(self, *args, slice_step: int = 1, val_slice_step: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["augment"], logger=False)
        self.slice_step, self.val_slice_step = int(slice_step), int(val_slice_step)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        seg_uids = sorted(u for u in self.index.uids_with_segmentation if u in set(self.index.train_uids))
        self.assign_split(seg_uids, "a segmentation (stage 1 learns from them)")

    def dataset(self, uids: Sequence[str], *, step: int = 1, train: bool = False) -> VertebraeSliceDataset:
        studies = [self.study(u) for u in uids]
        items = np.concatenate(
            [
                np.stack([np.full(len(r), i), r], 1)
                for i, s in enumerate(studies)
                for r in [np.arange(0, s.num_slices, step)]
            ]
        )
        presence = [s.vertebra_presence(self.presence_threshold, self.presence_unit) for s in studies]
        boxes = [s.spine_box for s in studies]
        if any(p is None for p in presence):
            raise RuntimeError("vertebrae dataset: every study needs a segmentation in the cache")
        augment = build_augment(self.augment_transforms, with_boxes=True) if train else None
        return VertebraeSliceDataset(
            studies,
            items,
            self.offsets,
            self.windows,
            self.input_size,
            presence=presence,
            boxes=boxes,
            augment=augment,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.train_uids, step=self.slice_step, train=True), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.val_uids, step=self.val_slice_step), train=False)


class FractureDataModule(RsnaDataModule):
    """Stage 2: spine crops of the slices that show C1..C7, with metadata and fracture targets."""

    def __init__(
        self,
        *args,
        stage1_predictions: str | None = None,
        visible_threshold: float = SliceCropSpec.visible_threshold,
        crop_margin: float = SliceCropSpec.crop_margin,
        min_crop: float = SliceCropSpec.min_crop,
        box_radius: int = 2,
        far_from_box_weight: float = 0.25,
        unboxed_positive_weight: float = 1.0,
        visibility_norm: str = SliceCropSpec.visibility_norm,
        pos_fraction: float | None = 0.5,
        epoch_size: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["augment"], logger=False)
        self.stage1_path = stage1_predictions
        self.crop_spec = SliceCropSpec(
            float(visible_threshold), float(crop_margin), float(min_crop), visibility_norm
        )
        self.visible_threshold = self.crop_spec.visible_threshold
        self.box_radius, self.far_from_box_weight = int(box_radius), float(far_from_box_weight)
        self.unboxed_positive_weight = float(unboxed_positive_weight)
        self.pos_fraction, self.epoch_size = pos_fraction, epoch_size
        self._stage1: dict | None = None

    # ---- per-study slice information -------------------------------------------------------------
    @property
    def stage1(self) -> dict:
        if self._stage1 is None:
            self._stage1 = read_stage1(self.stage1_path) if self.stage1_path else {}
        return self._stage1

    def visibility_and_boxes(self, uid: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Stage-1 predictions when present, else the segmentation; None when neither exists."""
        if uid in self.stage1:
            vis, boxes = self.stage1[uid]
            return self.crop_spec.visibility(vis), boxes
        s = self.study(uid)
        presence = s.vertebra_presence(self.presence_threshold, self.presence_unit)
        return None if presence is None else (presence, s.spine_box)

    def has_geometry(self, uid: str) -> bool:
        return self.visibility_and_boxes(uid) is not None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.split_usable()

    def slice_targets(self, uid: str, vis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-slice targets C_v × presence, refined by the study's bounding boxes; and loss weights.

        With boxes: a boxed slice is positive for the fractured level it lies in; positives farther than
        ``box_radius`` slices from every box get ``far_from_box_weight``. Without boxes: positives get
        ``unboxed_positive_weight`` (most slices of a fractured vertebra do not show the fracture).
        """
        study_label = self.index.labels.loc[uid, list(VERTEBRAE)].to_numpy(np.float32)
        present = (vis >= self.visible_threshold).astype(np.float32)
        target = present * study_label[None, :]
        weight = np.ones_like(target)
        boxes = self.index.boxes
        rows = boxes[boxes["StudyInstanceUID"] == uid] if len(boxes) else boxes
        if not len(rows):  # no boxes: every visible slice of a fractured level is a (noisy) positive
            weight = np.where(target > 0, self.unboxed_positive_weight, weight)
        else:
            numbers = np.asarray(self.study(uid).meta["instance_numbers"])
            pos = {int(n): i for i, n in enumerate(numbers)}
            boxed = sorted({pos[int(n)] for n in rows["slice_number"] if int(n) in pos})
            near = np.zeros(len(vis), dtype=bool)
            for z in boxed:
                near[max(0, z - self.box_radius) : z + self.box_radius + 1] = True
                fractured_here = np.flatnonzero(study_label > 0)
                if len(fractured_here):  # the boxed slice is positive for the fractured level it lies in
                    v = fractured_here[np.argmax(vis[z, fractured_here])]
                    target[z, v] = 1.0
            far = ~near[:, None] & (target > 0)
            weight = np.where(far, self.far_from_box_weight, weight)
        return target.astype(np.float32), weight.astype(np.float32)

    def dataset(
        self, uids: Sequence[str], *, train: bool = False, labelled: bool = True
    ) -> FractureSliceDataset:
        studies, items, crops, metas, targets, weights, visibility = [], [], [], [], [], [], []
        for i, uid in enumerate(uids):
            s = self.study(uid)
            vis, boxes = self.visibility_and_boxes(uid)
            z = self.crop_spec.scored_slices(vis)
            studies.append(s)
            items.append(np.stack([np.full(len(z), i), z], 1))
            crops.append(self.crop_spec.crops(boxes))
            sf = study_features(s.meta)
            metas.append(
                np.stack(
                    [
                        np.concatenate([slice_features(k, s.num_slices, vis[k]), sf])
                        for k in range(s.num_slices)
                    ]
                ).astype(np.float32)
            )
            visibility.append(vis)
            if labelled:
                t, w = self.slice_targets(uid, vis)
                targets.append(t)
                weights.append(w)
        items = np.concatenate(items) if items else np.zeros((0, 2), dtype=np.int64)
        return FractureSliceDataset(
            studies,
            items,
            self.offsets,
            self.windows,
            self.input_size,
            crops=crops,
            meta=metas,
            visibility=visibility,
            targets=targets if labelled else None,
            weights=weights if labelled else None,
            augment=build_augment(self.augment_transforms) if train else None,
        )

    @property
    def num_meta(self) -> int:
        return NUM_FEATURES

    def _sampler(self, ds: FractureSliceDataset) -> WeightedRandomSampler | None:
        if self.pos_fraction is None and self.epoch_size is None:
            return None
        pos = np.array([(ds.targets[s][z] * ds.weights[s][z]).max() > 0 for s, z in ds.items])
        w = np.ones(len(pos))
        if self.pos_fraction is not None and 0 < pos.sum() < len(pos):
            f = float(self.pos_fraction)
            w[pos] = f / pos.sum()
            w[~pos] = (1 - f) / (~pos).sum()
        n = int(self.epoch_size or len(ds))
        return WeightedRandomSampler(torch.as_tensor(w, dtype=torch.double), n, replacement=True)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(self.train_uids, train=True)
        return self._loader(ds, train=True, sampler=self._sampler(ds))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.val_uids), train=False)
