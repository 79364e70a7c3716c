"""Speed-ups of the single-study path give the same numbers as the straightforward code they replace."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cervspine.cache import CacheParams
from cervspine.cache.entry import (
    _cached_volume_reference,
    _spine_boxes_reference,
    cached_volume,
    spine_boxes,
)


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize(("shape", "size"), [((7, 96, 96), 32), ((5, 100, 80), 64), ((4, 40, 40), 64)])
def test_cached_volume_equals_clip_then_resize(dtype, shape, size):
    rng = np.random.default_rng(0)
    volume = rng.uniform(-3100, 4000, size=shape)  # beyond the cache's HU range on both sides
    volume = volume.astype(dtype) if dtype == np.float32 else np.rint(volume).astype(dtype)
    study = SimpleNamespace(volume=volume)
    for image_size in (size, None, shape[1]):
        params = CacheParams(image_size=image_size)
        got, want = cached_volume(study, params), _cached_volume_reference(study, params)
        assert got.dtype == want.dtype == np.int16
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("chunk", [1, 5, 32, 100])
def test_spine_boxes_by_chunks_equal_the_whole_volume_form(chunk):
    rng = np.random.default_rng(1)
    seg = np.zeros((37, 40, 30), dtype=np.uint8)
    for z in rng.choice(37, size=20, replace=False):
        y0, x0 = rng.integers(0, 30), rng.integers(0, 20)
        seg[z, y0 : y0 + rng.integers(1, 10), x0 : x0 + rng.integers(1, 10)] = rng.integers(1, 20)
    got, want = spine_boxes(seg, chunk=chunk), _spine_boxes_reference(seg)
    np.testing.assert_array_equal(got, want)  # NaN rows included
    assert np.isnan(got).any() and np.isfinite(got).any()


@pytest.fixture(scope="module")
def stages(shared_run, tiny_cache):
    """Two tiny trained stages (the shared run's stage-1 and slice stage-2 checkpoints) and a cached study
    of their data."""
    entry = sorted(p for p in tiny_cache.iterdir() if not p.name.startswith("."))[0]
    return shared_run.stage1, shared_run.slice_stage2, entry


@pytest.mark.parametrize("options", [{"num_threads": 1}, {"channels_last": True}])
def test_predictor_speed_options_keep_the_outputs(stages, options):
    import torch

    from cervspine.cache import CachedStudy
    from cervspine.inference import Predictor

    s1, s2, entry = stages
    study = CachedStudy(entry)
    threads = torch.get_num_threads()
    ref = Predictor.from_checkpoints(s1, s2, device="cpu").predict(study)
    fast = Predictor.from_checkpoints(s1, s2, device="cpu", **options).predict(study)
    assert torch.get_num_threads() == threads  # restored after scoring
    np.testing.assert_array_equal(fast.fracture_slices, ref.fracture_slices)
    np.testing.assert_allclose(fast.fracture_probs, ref.fracture_probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast.probabilities, ref.probabilities, rtol=0, atol=1e-5)
    cols = ref.slice_table.columns[3:]
    np.testing.assert_allclose(fast.slice_table[cols].to_numpy(), ref.slice_table[cols].to_numpy(), atol=1e-5)
