"""The model-input builders give what they gave before they were made cheaper (issue 32: the window's
arithmetic at the output size, each slice of a crop sequence resized once, the slice classifier's crops
windowed instead of its whole volume): the same numbers within 1e-5 (float rounding of the reordered
linear maps), on CT-like HU volumes with edges across every window's bounds."""

from __future__ import annotations

import numpy as np
import pytest

from cervspine.data.column_sampler import ColumnSampler
from cervspine.data.vertebra_crops import VertebraCropper, VertebraExtent
from cervspine.data.windows import WINDOWS, StackSpec, resolve_windows, windowed_resized
from experiments.benchmarks import inputs_reference as before

TOLERANCE = 1e-5
BONE_SOFT = tuple(resolve_windows(["bone", "soft"]))


def ct_like(z: int = 24, size: int = 160, seed: int = 0) -> np.ndarray:
    """int16 HU: air, fat, soft tissue, bone and metal-bright patches with sharp edges, plus noise."""
    rng = np.random.default_rng(seed)
    levels = np.array([-1000, -100, 40, 300, 900, 1500, 3000], dtype=np.float32)
    coarse = levels[rng.integers(0, len(levels), size=(z, size // 8, size // 8))]
    vol = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    vol += rng.normal(0, 30, size=vol.shape).astype(np.float32)
    return np.clip(vol, -1024, 3071).astype(np.int16)


@pytest.mark.parametrize("size", [48, 160, 224])  # smaller, the same, larger than the slices
def test_windowed_resized_is_windowing_then_resizing(size):
    hu = ct_like()
    got = windowed_resized(hu, BONE_SOFT, size)  # (N, nW, S, S)
    for i, w in enumerate(BONE_SOFT):
        want = np.stack([before.slice_stack(hu[j : j + 1], [w], size)[..., 0] for j in range(len(hu))])
        assert np.abs(got[:, i] - want).max() <= TOLERANCE
    assert got.min() >= 0.0 and got.max() <= 1.0 and (got == 0).any() and (got == 1).any()


def test_fractional_windows_are_kept_exactly_too():
    hu = ct_like(z=4)
    w = [(-123.5, 456.25)]
    got = windowed_resized(hu, w, 64)[:, 0]
    want = np.stack([before.slice_stack(hu[j : j + 1], w, 64)[..., 0] for j in range(len(hu))])
    assert np.abs(got - want).max() <= TOLERANCE


@pytest.mark.parametrize("context,size", [(1, 64), (2, 96)])
def test_the_column_inputs_are_the_same(context, size):
    hu = ct_like(z=40)
    sampler = ColumnSampler(input_size=size, context=context, windows=BONE_SOFT, z_step_mm=2.0)
    idx = sampler.positions(len(hu), 0.5)
    got = sampler.inputs(hu, idx, 0.5)
    want = before.column_inputs(sampler, hu, idx, 0.5)
    assert got.shape == want.shape == (len(idx), sampler.channels, size, size)
    assert np.abs(got - want).max() <= TOLERANCE


@pytest.mark.parametrize("size,box", [(96, (0.3, 0.3, 0.6, 0.6)), (32, (0.1, 0.2, 0.9, 1.0))])
def test_the_vertebra_sequences_are_the_same(size, box):
    hu = ct_like(z=40)
    cropper = VertebraCropper(n_slices=7, input_size=size, offsets=(-2, -1, 0, 1, 2), windows=BONE_SOFT)
    extent = VertebraExtent(2, True, 3, 38, box)
    got, zs = cropper.sequence(hu, extent)
    want = before.sequence_images(cropper, hu, extent)
    assert got.shape == want.shape == (7, 10, size, size) and len(zs) == 7
    assert np.abs(got - want).max() <= TOLERANCE


@pytest.mark.parametrize("size", [32, 96])
def test_the_slice_classifiers_crops_are_the_same(size, tiny_cache):
    from cervspine.cache import CachedStudy
    from cervspine.data.slice_crops import SliceCropSpec
    from cervspine.data.slice_inputs import slice_batch, slice_inputs
    from cervspine.data.stage1_table import Stage1Output

    entry = sorted(p for p in tiny_cache.iterdir() if (p / "meta.json").is_file())[0]
    study = CachedStudy(entry)
    z = study.num_slices
    vis = np.zeros((z, 7), np.float32)
    vis[5 : z - 5, 3] = 1.0
    boxes = np.tile(np.float32([0.2, 0.25, 0.7, 0.8]), (z, 1))
    stack = StackSpec(input_size=size, context=2, stride=2, windows=("bone", "soft"))
    spec = SliceCropSpec()
    inputs = slice_inputs(study, Stage1Output(vis, boxes), spec, stack)
    zs = inputs.slices[:6]
    got, metas, _ = slice_batch(inputs, zs, stack)
    want = before.slice_images(np.asarray(study.volume), inputs.crops, zs, stack)
    assert got.shape == want.shape == (6, 10, size, size) and len(metas) == 6
    assert np.abs(got - want).max() <= TOLERANCE


def test_the_named_windows_are_whole_hu():
    assert all(float(lo).is_integer() and float(hi).is_integer() for lo, hi in WINDOWS.values())


@pytest.mark.parametrize("crop", [None, np.float32([0.1, 0.2, 0.6, 0.9])])
def test_the_slice_datasets_stacks_are_the_same(crop, tiny_cache):
    from cervspine.cache import CachedStudy
    from cervspine.data.datasets import _SliceStacks

    study = CachedStudy(sorted(p for p in tiny_cache.iterdir() if (p / "meta.json").is_file())[0])
    ds = _SliceStacks([study], np.array([[0, 10]]), np.array([-2, 0, 2]), BONE_SOFT, 48)
    got = ds.stack(0, 10, crop)
    if crop is None:
        hu = study.slices(10 + ds.offsets)
    else:
        from cervspine.data.spine import crop_pixels

        y0, x0, y1, x1 = crop_pixels(crop, *study.volume.shape[1:])
        hu = np.asarray(study.volume[np.clip(10 + ds.offsets, 0, study.num_slices - 1), y0:y1, x0:x1])
    want = before.slice_stack(hu, BONE_SOFT, 48)
    assert got.shape == want.shape == (48, 48, 6) and np.abs(got - want).max() <= TOLERANCE
