"""CT windows, 2.5D stacking and augmentation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

# (low, high) HU. Bone window L=400 W=1800; soft tissue L=40 W=400; wide L=300 W=3000 (our names).
WINDOWS = {"bone": (-500.0, 1300.0), "soft": (-160.0, 240.0), "wide": (-1200.0, 1800.0)}


def resolve_windows(windows: Sequence[str | Sequence[float]]) -> list[tuple[float, float]]:
    """Window names or explicit (low, high) pairs → (low, high) pairs."""
    out = []
    for w in windows:
        if isinstance(w, str):
            if w not in WINDOWS:
                raise ValueError(f"unknown CT window {w!r}; known: {sorted(WINDOWS)} or a [low, high] pair")
            out.append(WINDOWS[w])
        else:
            low, high = (float(x) for x in w)
            if high <= low:
                raise ValueError(f"window {w!r}: high must exceed low")
            out.append((low, high))
    return out


def context_offsets(context: int, stride: int) -> np.ndarray:
    """Slice offsets of a 2.5D stack: ``context`` neighbours each side, ``stride`` slices apart."""
    return np.arange(-context, context + 1) * stride


@dataclass(frozen=True)
class StackSpec:
    """A stage's 2.5D input: ``context`` neighbours each side ``stride`` slices apart, CT ``windows``,
    resized to ``input_size``. The defaults are the DataModules' (one copy, read back from checkpoints)."""

    input_size: int = 128
    context: int = 1
    stride: int = 1
    windows: tuple = ("bone",)

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> StackSpec:
        d = cls()
        return cls(
            int(hp.get("input_size", d.input_size)),
            int(hp.get("context", d.context)),
            int(hp.get("stride", d.stride)),
            tuple(hp.get("windows", d.windows)),
        )

    @property
    def offsets(self) -> np.ndarray:
        return context_offsets(self.context, self.stride)

    @property
    def hu_windows(self) -> list[tuple[float, float]]:
        return resolve_windows(list(self.windows))

    @property
    def channels(self) -> int:
        return len(self.offsets) * len(self.windows)


def apply_windows(hu: np.ndarray, windows: Sequence[tuple[float, float]], axis: int = 0) -> np.ndarray:
    """HU values → float32 in [0, 1] per window, the windows along a new ``axis`` (the one copy of CT
    windowing: slice datasets, crop sequences and inference all call it)."""
    hu = np.asarray(hu, dtype=np.float32)
    shape = list(hu.shape)
    shape.insert(axis, len(windows))
    out = np.empty(shape, dtype=np.float32)  # contiguous in the layout asked for
    per_window = np.moveaxis(out, axis, 0)
    for i, (lo, hi) in enumerate(windows):
        np.clip((hu - lo) / (hi - lo), 0.0, 1.0, out=per_window[i])
    return out


def window_stack(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """(K, H, W) HU → (H, W, K·len(windows)) float32 in [0, 1], window-major channel order."""
    win = apply_windows(hu, windows)  # (nW, K, H, W)
    return np.ascontiguousarray(win.reshape(-1, *win.shape[2:]).transpose(1, 2, 0))


def resize_hwc(img: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, C) to (size, size, C) keeping the channel axis for any C."""
    if img.shape[:2] == (size, size):
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    chans = [cv2.resize(img[..., c], (size, size), interpolation=interp) for c in range(img.shape[2])]
    return np.stack(chans, axis=-1)


def build_augment(
    transforms: Sequence[A.BasicTransform] | None, *, with_boxes: bool = False
) -> A.Compose | None:
    """Compose already-instantiated albumentations transforms (from the data config).

    albumentations keeps its own random generator: it is seeded from torch's seed (set by the run's
    ``seed``), so a seeded run repeats its augmentations exactly.
    """
    if not transforms:
        return None
    bbox = (
        A.BboxParams(format="albumentations", label_fields=["box_labels"], clip=True) if with_boxes else None
    )
    return A.Compose(list(transforms), bbox_params=bbox, seed=int(torch.initial_seed() % 2**31))
