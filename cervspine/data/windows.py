"""CT windows, 2.5D stacks and resizing: the torch-free half of the input building (also what a model
bundle's runtime uses, :mod:`cervspine.bundle`). :mod:`cervspine.data.transforms` re-exports it next to
the augmentation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2
import numpy as np

T = TypeVar("T")
R = TypeVar("R")

# (low, high) HU. Bone window L=400 W=1800; soft tissue L=40 W=400; wide L=300 W=3000; bone_only L=725
# W=1150: soft tissue, fat, air and discs (≤ ~100 HU) all black, only bone shows (our names).
WINDOWS = {
    "bone": (-500.0, 1300.0),
    "soft": (-160.0, 240.0),
    "wide": (-1200.0, 1800.0),
    "bone_only": (150.0, 1300.0),
}


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


def clipped_hu(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 HU clipped to [lo, hi] (in int16 where the cache's int16 meets whole-HU bounds: cheaper)."""
    if (
        hu.dtype == np.int16
        and float(lo).is_integer()
        and float(hi).is_integer()
        and -32768 <= lo <= hi <= 32767
    ):
        return np.clip(hu, np.int16(lo), np.int16(hi)).astype(np.float32)
    return np.clip(hu.astype(np.float32, copy=False), lo, hi)


def windowed_resized(hu: np.ndarray, windows: Sequence[tuple[float, float]], size: int) -> np.ndarray:
    """(N, H, W) HU → (N, nW, size, size) float32: :func:`apply_windows` then :func:`resize_hwc` of each
    slice. Where ``size``² is the smaller, computed as the resize of the HU clipped to each window, then
    the window's linear map at the output size: the same numbers (a resize is linear and its weights sum
    to one; float rounding apart, ≤ 1e-5) with the per-voxel arithmetic at ``size``², not the cache's."""
    hu = np.asarray(hu)
    n, h, w = hu.shape
    out = np.empty((n, len(windows), size, size), dtype=np.float32)
    shrink = size * size < h * w
    for i, (lo, hi) in enumerate(windows):
        plane = clipped_hu(hu, lo, hi) if shrink else apply_windows(hu, [(lo, hi)], axis=1)[:, 0]
        for j in range(n):
            out[j, i] = resize_plane(plane[j], size)
        if shrink:
            view = out[:, i]
            view -= np.float32(lo)
            view /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out) if shrink else out


def resize_plane(img: np.ndarray, size: int) -> np.ndarray:
    """One (H, W) image to (size, size), as :func:`resize_hwc` resizes each channel."""
    if img.shape == (size, size):
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=interp)


def window_stack(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """(K, H, W) HU → (H, W, K·len(windows)) float32 in [0, 1], window-major channel order."""
    win = apply_windows(hu, windows)  # (nW, K, H, W)
    return np.ascontiguousarray(win.reshape(-1, *win.shape[2:]).transpose(1, 2, 0))


def resize_hwc(img: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W, C) to (size, size, C) keeping the channel axis for any C."""
    if img.shape[:2] == (size, size):
        return img
    return np.stack([resize_plane(img[..., c], size) for c in range(img.shape[2])], axis=-1)


def windowed_volume(volume: np.ndarray, stack: StackSpec) -> np.ndarray:
    """(Z, H, W) HU → (Z, nW, S, S) float32 windowed and resized to ``stack.input_size`` (once per study)."""
    win = apply_windows(volume, stack.hu_windows, axis=1)
    size = stack.input_size
    if win.shape[2:] != (size, size):
        win = np.stack([resize_hwc(w.transpose(1, 2, 0), size).transpose(2, 0, 1) for w in win])
    return win


def stack_slices(win: np.ndarray, z: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(Z, nW, S, S) windowed volume → (B, nW·K, S, S) 2.5D stacks of slices ``z``, window-major (the
    neighbours ``z + offsets`` clamped at the scan's ends)."""
    idx = np.clip(np.asarray(z)[:, None] + np.asarray(offsets)[None, :], 0, win.shape[0] - 1)
    x = win[idx]  # (B, K, nW, S, S)
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4).reshape(len(idx), -1, *win.shape[2:]))


def input_threads(limit: int = 8) -> int:
    """Threads for one study's numpy/OpenCV input work at inference: the usable cores, at most ``limit``
    (the work releases the GIL: decoding, windowing and resizing run side by side)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, usable))


def parallel_map(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on ``threads`` threads (None: :func:`input_threads`), in order."""
    items = list(items)
    n = input_threads() if threads is None else max(1, int(threads))
    if n == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(n, len(items))) as pool:
        return list(pool.map(fn, items))
