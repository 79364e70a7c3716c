"""The preprocessed cache: exact content, resumable, stale detection, atomic entries, shards, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cervspine.cache import CachedStudy, CacheParams, preprocess
from cervspine.cache.entry import area_fractions, spine_boxes, vertebra_areas
from cervspine.io import load_segmentation, load_study
from cervspine.io.rsna import RsnaIndex
from tests.helpers import writable_copy


@pytest.fixture()
def root(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny folder (these tests modify it)."""
    return writable_copy(tiny_root, tmp_path / "rsna", ".cervspine_cache")


def test_entries_hold_the_study_exactly(root, tmp_path):
    index = RsnaIndex.from_root(root)
    report = preprocess(index, tmp_path / "c", CacheParams(image_size=None), workers=2, progress=False)
    assert report.ok and len(report.built) == len(index.train_uids) + len(index.test_uids)
    uid = index.uids_with_segmentation[0]
    study = load_study(index.study_dir(uid))
    entry = CachedStudy(tmp_path / "c" / uid)
    np.testing.assert_array_equal(entry.volume, np.clip(study.volume, -1024, 3071))
    seg = load_segmentation(index.segmentation_path(uid), study)
    np.testing.assert_array_equal(entry.seg, seg)
    np.testing.assert_array_equal(entry.vertebra_area, vertebra_areas(seg))
    assert entry.meta["instance_numbers"] == study.instance_numbers.tolist()
    presence = entry.vertebra_presence(0.1)
    assert presence.shape == (study.volume.shape[0], 7)
    # every vertebra shows on some slice, and C1 appears above (lower index than) C7
    assert presence.any(axis=0).all()
    assert np.flatnonzero(presence[:, 0]).mean() < np.flatnonzero(presence[:, 6]).mean()


def test_presence_thresholds_and_spine_boxes():
    seg = np.zeros((4, 10, 10), np.uint8)
    seg[0, 2:6, 2:6] = 1  # C1, 16 px (its largest section)
    seg[1, 2:4, 2:4] = 1  # C1, 4 px = 0.25 of the largest
    seg[2, 5:7, 1:9] = 3  # C3
    frac = area_fractions(vertebra_areas(seg))
    np.testing.assert_allclose(frac[:, 0], [1.0, 0.25, 0.0, 0.0])
    boxes = spine_boxes(seg)
    np.testing.assert_allclose(boxes[0], [0.2, 0.2, 0.6, 0.6])
    np.testing.assert_allclose(boxes[2], [0.5, 0.1, 0.7, 0.9])
    assert np.isnan(boxes[3]).all()


def test_rerun_skips_current_entries_and_rebuilds_stale_ones(root, tmp_path):
    index = RsnaIndex.from_root(root)
    cache, params = tmp_path / "c", CacheParams(image_size=32)
    first = preprocess(index, cache, params, workers=1, progress=False)
    second = preprocess(index, cache, params, workers=1, progress=False)
    assert not second.built and sorted(second.skipped) == sorted(first.built)
    uid = index.train_uids[0]
    some_file = next(index.study_dir(uid).iterdir())
    os.utime(some_file, ns=(time.time_ns(), time.time_ns() + 10**9))  # the source changed
    third = preprocess(index, cache, params, workers=1, progress=False)
    assert third.built == [uid]
    fourth = preprocess(index, cache, CacheParams(image_size=48), workers=1, progress=False)
    assert len(fourth.built) == len(first.built)  # other parameters: every entry is stale
    assert CachedStudy(cache / uid).volume.shape[1:] == (48, 48)


def test_half_written_entries_are_never_read(root, tmp_path):
    index = RsnaIndex.from_root(root)
    cache, params = tmp_path / "c", CacheParams(image_size=32)
    uid = index.train_uids[0]
    (cache / f".tmp-{uid}-999").mkdir(parents=True)  # leftover of a killed run
    (cache / uid).mkdir()
    np.save(cache / uid / "volume.npy", np.zeros((2, 2, 2), np.int16))  # no meta.json: incomplete
    with pytest.raises(FileNotFoundError, match="not a complete cache entry"):
        CachedStudy(cache / uid)
    report = preprocess(index, cache, params, workers=1, progress=False)
    assert uid in report.built and not list(cache.glob(".tmp-*"))
    assert CachedStudy(cache / uid).volume.shape[1:] == (32, 32)


def test_shards_cover_every_study_once(root, tmp_path):
    index = RsnaIndex.from_root(root)
    params = CacheParams(image_size=32)
    a = preprocess(index, tmp_path / "c", params, workers=1, shard="0/2", progress=False)
    b = preprocess(index, tmp_path / "c", params, workers=1, shard="1/2", progress=False)
    assert not set(a.built) & set(b.built)
    assert sorted(a.built + b.built) == sorted(index.train_uids + index.test_uids)
    with pytest.raises(ValueError, match="shard"):
        preprocess(index, tmp_path / "c", params, shard="2/2", progress=False)


def test_a_bad_study_fails_alone_and_the_cli_exits_nonzero(root, tmp_path):
    index = RsnaIndex.from_root(root)
    bad = index.test_uids[0]
    for f in index.study_dir(bad).iterdir():
        f.write_bytes(b"not a dicom file")
    report = preprocess(index, tmp_path / "c", CacheParams(image_size=32), workers=2, progress=False)
    assert list(report.failed) == [bad] and bad in report.failed
    assert len(report.built) == len(index.train_uids) + len(index.test_uids) - 1
    cmd = [
        sys.executable,
        "-m",
        "cervspine.preprocess",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'c2'}",
        "data.image_size=32",
        f"hydra.run.dir={tmp_path / 'run'}",
        "progress=false",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and bad in proc.stderr


def test_preprocess_killed_midway_resumes_cleanly(tmp_path):
    from cervspine.synthetic import write_rsna_folder

    # the kill follows the first complete entry within ~10 ms; each of the 7 others takes far longer
    root = tmp_path / "rsna"
    write_rsna_folder(root, n_train=8, n_test=0, size=64, slices=(80, 100), seed=9, seg_fraction=0.5)
    cache = tmp_path / "c"
    cmd = [
        sys.executable,
        "-m",
        "cervspine.preprocess",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        "data.image_size=64",
        "workers=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        "progress=false",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120

    def complete() -> set[str]:  # finished entries; .tmp-* folders are work in progress
        return {p.name for p in cache.glob("[!.]*") if (p / "meta.json").exists()}

    while time.time() < deadline and not complete():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = complete()
    index = RsnaIndex.from_root(root)
    total = len(index.train_uids) + len(index.test_uids)
    assert 1 <= len(done_before) < total, "the kill should land mid-way"
    report = preprocess(index, cache, CacheParams(image_size=64), workers=1, progress=False)
    assert report.ok and set(report.skipped) == done_before
    assert len(report.built) + len(report.skipped) == total
    for p in cache.iterdir():
        assert not p.name.startswith(".")
        json.loads((p / "meta.json").read_text())
        assert CachedStudy(p).volume.shape[1:] == (64, 64)
