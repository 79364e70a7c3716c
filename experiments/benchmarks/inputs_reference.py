"""The model-input builders as they were before issue 32 (window every voxel at the cache's size, then
resize channel by channel; stage 2's sequences resized stack by stack, the slice classifier's whole volume
windowed once): the baseline of ``experiments.benchmarks.inputs`` and what ``tests/test_input_builders.py``
compares the current builders with."""

from __future__ import annotations

import cv2
import numpy as np

from cervspine.data.spine import crop_pixels
from cervspine.data.windows import apply_windows


def resize_hwc(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    chans = [cv2.resize(img[..., c], (size, size), interpolation=interp) for c in range(img.shape[2])]
    return np.stack(chans, axis=-1)


def column_inputs(sampler, volume: np.ndarray, idx: np.ndarray, dz_mm: float) -> np.ndarray:
    """``ColumnSampler.inputs`` before: (L, C, S, S)."""
    k, z = sampler.stride(dz_mm), volume.shape[0]
    offsets = np.arange(-sampler.context, sampler.context + 1) * k
    need = np.clip(np.asarray(idx)[:, None] + offsets[None, :], 0, z - 1)
    uniq, inv = np.unique(need, return_inverse=True)
    win = apply_windows(np.asarray(volume[uniq]), sampler.windows, axis=1)
    if win.shape[2:] != (sampler.input_size, sampler.input_size):
        win = np.stack([resize_hwc(w.transpose(1, 2, 0), sampler.input_size).transpose(2, 0, 1) for w in win])
    stacks = win[inv.reshape(need.shape)]
    return np.ascontiguousarray(stacks.transpose(0, 2, 1, 3, 4).reshape(len(idx), -1, *win.shape[2:]))


def sequence_images(cropper, volume: np.ndarray, extent) -> np.ndarray:
    """The image channels of ``VertebraCropper.sequence`` before: (n, C, S, S)."""
    n, s = cropper.n_slices, cropper.input_size
    zs = extent.sample(n)
    if not extent.present:
        return np.zeros((n, cropper.image_channels, s, s), dtype=np.float32)
    num, height, width = volume.shape
    y0, x0, y1, x1 = crop_pixels(np.asarray(extent.box), height, width)
    idx = np.clip(zs[:, None] + np.asarray(cropper.offsets)[None, :], 0, num - 1)
    uniq, inv = np.unique(idx, return_inverse=True)
    hu = np.asarray(volume[uniq, y0:y1, x0:x1], dtype=np.float32)
    win = apply_windows(hu, cropper.windows, axis=1)
    stacks = win[inv.reshape(idx.shape)]
    stacks = stacks.transpose(0, 2, 1, 3, 4).reshape(n * cropper.image_channels, y1 - y0, x1 - x0)
    img = resize_hwc(np.ascontiguousarray(stacks.transpose(1, 2, 0)), s)
    return img.reshape(s, s, n, cropper.image_channels).transpose(2, 3, 0, 1)


def slice_images(volume: np.ndarray, crops: np.ndarray, zs: np.ndarray, stack) -> np.ndarray:
    """The images of ``slice_batch`` before (the whole volume windowed first): (b, C, S, S)."""
    win = apply_windows(volume, stack.hu_windows, axis=1)
    h, w = volume.shape[1:]
    imgs = []
    for z in zs:
        y0, x0, y1, x1 = crop_pixels(crops[z], h, w)
        idx = np.clip(z + stack.offsets, 0, volume.shape[0] - 1)
        patch = win[idx][:, :, y0:y1, x0:x1]
        hwc = patch.transpose(1, 0, 2, 3).reshape(-1, y1 - y0, x1 - x0).transpose(1, 2, 0)
        imgs.append(resize_hwc(np.ascontiguousarray(hwc), stack.input_size).transpose(2, 0, 1))
    return np.stack(imgs)


def slice_stack(hu: np.ndarray, windows, size: int) -> np.ndarray:
    """``_SliceStacks.stack`` before: (S, S, C)."""
    win = apply_windows(hu, windows)
    hwc = np.ascontiguousarray(win.reshape(-1, *win.shape[2:]).transpose(1, 2, 0))
    return resize_hwc(hwc, size)
