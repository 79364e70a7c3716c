"""Stage 2, per-vertebra sequences: a DataModule of 2.5D crop sequences of C1..C7 (see vertebra_crops)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from cervspine import VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.data.datamodules import RsnaDataModule
from cervspine.data.stage1_table import read_stage1
from cervspine.data.transforms import build_augment
from cervspine.data.vertebra_crops import VertebraCropper, VertebraExtent

log = logging.getLogger(__name__)
SAMPLE_MODES = ("study", "vertebra")


@dataclass
class StudyGeometry:
    """One study's per-slice visibility (Z, 7), spine boxes (Z, 4) and the 7 vertebra extents."""

    vis: np.ndarray
    boxes: np.ndarray
    extents: list[VertebraExtent]


class VertebraSequenceDataset(Dataset):
    """Items (study, vertebrae): ``image`` (V, N, C, S, S), ``present``/``vertebra``/``target`` (V,),
    ``slices`` (V, N), ``overall_target`` and ``study_idx``. V = 7 (study mode) or 1 (vertebra mode)."""

    def __init__(
        self,
        studies: Sequence[CachedStudy],
        geometry: Sequence[StudyGeometry],
        items: Sequence[tuple[int, tuple[int, ...]]],
        cropper: VertebraCropper,
        targets: np.ndarray | None = None,
        augment: A.Compose | None = None,
    ):
        self.studies, self.geometry, self.items = list(studies), list(geometry), list(items)
        self.cropper, self.targets, self.augment = cropper, targets, augment

    def __len__(self) -> int:
        return len(self.items)

    def _augment(self, x: np.ndarray) -> np.ndarray:
        """One random transform for every slice of the sequence: slices are stacked along channels."""
        n, c, s, _ = x.shape
        ci = self.cropper.image_channels
        img = np.ascontiguousarray(x[:, :ci].transpose(2, 3, 0, 1).reshape(s, s, n * ci))
        if c > ci:
            out = self.augment(image=img, mask=np.ascontiguousarray(x[:, ci].transpose(1, 2, 0)))
            mask = np.asarray(out["mask"], dtype=np.float32).reshape(s, s, n).transpose(2, 0, 1)[:, None]
        else:
            out, mask = self.augment(image=img), None
        img = np.asarray(out["image"], dtype=np.float32).reshape(s, s, n, ci).transpose(2, 3, 0, 1)
        return img if mask is None else np.concatenate([img, mask], axis=1)

    def __getitem__(self, i: int) -> dict:
        s, verts = self.items[i]
        study, geo = self.studies[s], self.geometry[s]
        seg = study.seg if self.cropper.mask == "auto" else None
        images, slices = [], []
        for v in verts:
            x, z = self.cropper.sequence(study.volume, geo.extents[v], geo.vis, geo.boxes, seg)
            if self.augment is not None and geo.extents[v].present:
                x = self._augment(x)
            images.append(x)
            slices.append(z)
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(np.stack(images), dtype=np.float32)),
            "present": torch.tensor([float(geo.extents[v].present) for v in verts]),
            "vertebra": torch.tensor(verts, dtype=torch.long),
            "slices": torch.from_numpy(np.stack(slices)),
            "study_idx": int(s),
        }
        if self.targets is not None:
            sample["target"] = torch.from_numpy(self.targets[s, list(verts)].astype(np.float32))
            sample["overall_target"] = torch.tensor(float(self.targets[s, len(VERTEBRAE)]))
        return sample


class VertebraSequenceDataModule(RsnaDataModule):
    """C1..C7 crop sequences of the training studies, geometry from the segmentation or stage 1.

    ``sample="study"``: an item is a study with its 7 sequences (the model can learn patient_overall);
    ``"vertebra"``: an item is one vertebra (patient_overall = noisy-or at evaluation).
    """

    def __init__(
        self,
        *args,
        stage1_predictions: str | None = None,
        use_segmentation: bool = True,
        visible_threshold: float = VertebraCropper.visible_threshold,
        relative_threshold: float = VertebraCropper.relative_threshold,
        n_slices: int = VertebraCropper.n_slices,
        crop_margin: float = VertebraCropper.margin,
        z_margin: float = VertebraCropper.z_margin,
        min_crop: float = VertebraCropper.min_size,
        max_gap: int = VertebraCropper.max_gap,
        mask: str = VertebraCropper.mask,
        sample: str = "study",
        pos_fraction: float | None = None,
        epoch_size: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters(ignore=["augment"], logger=False)
        if sample not in SAMPLE_MODES:
            raise ValueError(f"sample must be one of {SAMPLE_MODES}, got {sample!r}")
        self.stage1_path, self.use_segmentation = stage1_predictions, bool(use_segmentation)
        self.sample, self.pos_fraction, self.epoch_size = sample, pos_fraction, epoch_size
        self.cropper = VertebraCropper.from_hparams(dict(self.hparams))
        self._stage1: dict | None = None
        self._geometry: dict[str, StudyGeometry] = {}

    @property
    def stage1(self) -> dict:
        if self._stage1 is None:
            self._stage1 = read_stage1(self.stage1_path) if self.stage1_path else {}
        return self._stage1

    def geometry(self, uid: str) -> StudyGeometry | None:
        """Visibility/boxes from stage 1 (else the segmentation); extents from the segmentation when
        ``use_segmentation`` and one exists, else from stage 1. None when neither source exists."""
        if uid in self._geometry:
            return self._geometry[uid]
        s = self.study(uid)
        presence = s.vertebra_presence(self.presence_threshold, self.presence_unit)
        if uid in self.stage1:
            vis, boxes = self.stage1[uid]
        elif presence is not None:
            vis, boxes = presence, s.spine_box
        else:
            return None
        if self.use_segmentation and presence is not None and s.seg is not None:
            extents = self.cropper.extents_from_segmentation(s.seg, presence)
        else:
            extents = self.cropper.extents_from_stage1(vis, boxes)
        self._geometry[uid] = StudyGeometry(vis, boxes, extents)
        return self._geometry[uid]

    def has_geometry(self, uid: str) -> bool:
        return self.geometry(uid) is not None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.split_usable()

    def dataset(self, uids: Sequence[str], *, train: bool = False) -> VertebraSequenceDataset:
        n_vert = len(VERTEBRAE)
        if self.sample == "study":
            items = [(i, tuple(range(n_vert))) for i in range(len(uids))]
        else:
            items = [(i, (v,)) for i in range(len(uids)) for v in range(n_vert)]
        return VertebraSequenceDataset(
            [self.study(u) for u in uids],
            [self.geometry(u) for u in uids],
            items,
            self.cropper,
            targets=self.labels(uids),
            augment=build_augment(self.augment_transforms) if train else None,
        )

    def images_per_sample(self, uids: Sequence[str], *, train: bool) -> int:
        """``n_slices`` crops for each vertebra of an item (7 a study, or one)."""
        return self.cropper.n_slices * (len(VERTEBRAE) if self.sample == "study" else 1)

    def _weights(self, ds: VertebraSequenceDataset) -> np.ndarray:
        """Sampling weight per item: ``pos_fraction`` of the draws go to items with a positive target."""
        pos = np.array([ds.targets[s, list(v)].max() > 0 for s, v in ds.items])
        w = np.ones(len(pos))
        if self.pos_fraction is not None and 0 < pos.sum() < len(pos):
            f = float(self.pos_fraction)
            w[pos], w[~pos] = f / pos.sum(), (1 - f) / (~pos).sum()
        return w / w.sum()

    def sampling_logit_shift(self) -> tuple[float, float]:
        """(vertebra, patient_overall) logit(positive rate as sampled) − logit(natural rate) of the
        training items: subtracted from the model's logits at evaluation, it undoes the prior shift
        that ``pos_fraction`` oversampling teaches (0 without it)."""
        if self.pos_fraction is None:
            return 0.0, 0.0
        ds = self.dataset(self.train_uids)
        w = self._weights(ds)
        vert = np.array([ds.targets[s, list(v)].mean() for s, v in ds.items])
        overall = ds.targets[[s for s, _ in ds.items], len(VERTEBRAE)]

        def shift(rate: np.ndarray) -> float:
            a, b = np.clip([(w * rate).sum(), rate.mean()], 1e-4, 1 - 1e-4)
            return float(np.log(a / (1 - a)) - np.log(b / (1 - b)))

        return shift(vert), shift(overall)

    def _sampler(self, ds: VertebraSequenceDataset) -> WeightedRandomSampler | None:
        if self.pos_fraction is None and self.epoch_size is None:
            return None
        w = torch.as_tensor(self._weights(ds), dtype=torch.double)
        return WeightedRandomSampler(w, int(self.epoch_size or len(ds)), replacement=True)

    def train_dataloader(self) -> DataLoader:
        ds = self.dataset(self.train_uids, train=True)
        return self._loader(ds, train=True, sampler=self._sampler(ds))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset(self.val_uids), train=False)
