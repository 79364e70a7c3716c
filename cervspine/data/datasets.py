"""Per-slice 2.5D datasets read from the cache (memory-mapped: no whole volume per sample)."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from cervspine.cache import CachedStudy
from cervspine.data.spine import crop_pixels
from cervspine.data.windows import windowed_resized


class _SliceStacks(Dataset):
    """Shared part: (study, slice) items → windowed 2.5D stacks as (H, W, C) float32."""

    def __init__(
        self,
        studies: Sequence[CachedStudy],
        items: np.ndarray,
        offsets: np.ndarray,
        windows: Sequence[tuple[float, float]],
        input_size: int,
    ):
        self.studies = list(studies)
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        self.offsets = np.asarray(offsets)
        self.windows = list(windows)
        self.input_size = int(input_size)

    def __len__(self) -> int:
        return len(self.items)

    def stack(self, s: int, z: int, crop: np.ndarray | None = None) -> np.ndarray:
        study = self.studies[s]
        if crop is None:
            hu = study.slices(z + self.offsets)
        else:
            y0, x0, y1, x1 = crop_pixels(crop, *study.volume.shape[1:])
            idx = np.clip(z + self.offsets, 0, study.num_slices - 1)
            hu = np.asarray(study.volume[idx, y0:y1, x0:x1])
        win = windowed_resized(hu, self.windows, self.input_size)  # (K, nW, S, S)
        chw = win.transpose(1, 0, 2, 3).reshape(-1, *win.shape[2:])  # window-major channels
        return np.ascontiguousarray(chw.transpose(1, 2, 0))


def _chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class VertebraeSliceDataset(_SliceStacks):
    """Whole slices; targets: C1..C7 presence and the normalised spine box (masked where absent)."""

    def __init__(
        self,
        *args,
        presence: Sequence[np.ndarray],
        boxes: Sequence[np.ndarray],
        augment: A.Compose | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.presence = presence
        self.boxes = boxes
        self.augment = augment

    def __getitem__(self, i: int) -> dict:
        s, z = self.items[i]
        img = self.stack(s, z)
        box = np.asarray(self.boxes[s][z], dtype=np.float32)
        has_box = bool(np.isfinite(box).all())
        if self.augment is not None:
            # albumentations boxes are (x_min, y_min, x_max, y_max); ours are (y0, x0, y1, x1)
            bxs = [[box[1], box[0], box[3], box[2]]] if has_box else []
            out = self.augment(image=img, bboxes=bxs, box_labels=[0] * len(bxs))
            img = out["image"]
            if has_box and len(out["bboxes"]):
                x0, y0, x1, y1 = np.asarray(out["bboxes"][0], dtype=np.float32)
                box = np.array([y0, x0, y1, x1], dtype=np.float32)
            elif has_box:
                has_box = False
        return {
            "image": _chw(img.astype(np.float32, copy=False)),
            "target": torch.from_numpy(np.asarray(self.presence[s][z], dtype=np.float32)),
            "box": torch.from_numpy(np.nan_to_num(box, nan=0.0)),
            "box_mask": torch.tensor(float(has_box)),
            "study_idx": int(s),
            "slice_index": int(z),
        }


class FractureSliceDataset(_SliceStacks):
    """Spine crops with the metadata vector; targets: per-vertebra slice fracture labels and weights."""

    def __init__(
        self,
        *args,
        crops: Sequence[np.ndarray],
        meta: Sequence[np.ndarray],
        targets: Sequence[np.ndarray] | None = None,
        weights: Sequence[np.ndarray] | None = None,
        visibility: Sequence[np.ndarray] | None = None,
        augment: A.Compose | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.crops, self.meta = crops, meta
        self.targets, self.weights, self.visibility = targets, weights, visibility
        self.augment = augment

    def __getitem__(self, i: int) -> dict:
        s, z = self.items[i]
        img = self.stack(s, z, self.crops[s][z])
        if self.augment is not None:
            img = self.augment(image=img)["image"]
        sample = {
            "image": _chw(img.astype(np.float32, copy=False)),
            "meta": torch.from_numpy(self.meta[s][z]),
            "study_idx": int(s),
            "slice_index": int(z),
        }
        if self.visibility is not None:
            sample["visibility"] = torch.from_numpy(np.asarray(self.visibility[s][z], dtype=np.float32))
        if self.targets is not None:
            sample["target"] = torch.from_numpy(np.asarray(self.targets[s][z], dtype=np.float32))
            sample["weight"] = torch.from_numpy(np.asarray(self.weights[s][z], dtype=np.float32))
        return sample
