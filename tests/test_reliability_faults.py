"""Injected faults outside training (issue 8): a full disk on every kind of write, a crashing DICOM decoder,
preprocessing killed mid-way. Each case and its expected outcome is listed in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from cervspine.cache import (
    CachedStudy,
    CacheParams,
    build_entry,
    entry_is_current,
    preprocess,
    source_fingerprint,
)
from cervspine.io import decode_pool
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.io.dicom import shutdown_decoders
from cervspine.io.rsna import RsnaIndex
from cervspine.synthetic import write_rsna_folder
from tests.helpers import mounted_tmpfs

ENOSPC = errno.ENOSPC


def _remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _no_space(*_args, **_kwargs):
    raise OSError(ENOSPC, os.strerror(ENOSPC))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """4 train + 2 test studies of 32², 10–12 slices, every one JPEG Lossless (decoded by the worker pool)."""
    root = tmp_path_factory.mktemp("faults") / "rsna"
    write_rsna_folder(
        root, n_train=4, n_test=2, size=32, slices=(10, 12), seed=5, seg_fraction=0.5,
        quirks={"transfer_syntax": {"jpeg_lossless": 1.0}},
    )  # fmt: skip
    return root


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.is_dir() else []


def _assert_complete(cache: Path) -> None:
    """Every visible entry is complete and readable; no temp or stale folder is left."""
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]
    for entry in _entries(cache):
        study = CachedStudy(entry)
        assert study.volume.shape[0] == study.num_slices
        json.loads((entry / "meta.json").read_text())


# ----------------------------------------------------------------------------------------- full disk


def test_cache_on_a_real_full_disk_fails_cleanly_and_resumes(small_root, tmp_path):
    index = RsnaIndex.from_root(small_root)
    params = CacheParams(image_size=32)
    with mounted_tmpfs(tmp_path / "cache", "96k") as cache:
        report = preprocess(index, cache, params, workers=1, progress=False)
        assert report.failed and report.built, "the disk should fill up part way"
        assert all("No space left on device" in why for why in report.failed.values())
        _assert_complete(cache)
        assert sorted(p.name for p in _entries(cache)) == sorted(report.built)
        _remount(cache, "8m")  # space freed: the rerun builds only what is missing
        again = preprocess(index, cache, params, workers=1, progress=False)
        assert again.ok and sorted(again.built) == sorted(report.failed)
        assert sorted(again.skipped) == sorted(report.built)
        _assert_complete(cache)


def test_cache_rebuild_on_a_full_disk_keeps_the_old_entry(small_root, tmp_path, monkeypatch):
    index = RsnaIndex.from_root(small_root)
    uid = index.train_uids[0]
    cache, study_dir = tmp_path / "c", index.study_dir(uid)
    old = build_entry(uid, study_dir, None, cache, CacheParams(image_size=32), "train")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(np, "save", _no_space)
    report = preprocess(index, cache, CacheParams(image_size=16), workers=1, progress=False)  # all stale
    assert set(report.failed) == set(index.train_uids + index.test_uids)
    assert "[Errno 28] No space left on device" in report.failed[uid]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before  # untouched, still readable
    assert not entry_is_current(old, source_fingerprint(study_dir, None, CacheParams(image_size=16)))
    _assert_complete(cache)


def test_submission_csv_on_a_real_full_disk_keeps_the_old_file(tmp_path):
    with mounted_tmpfs(tmp_path / "out", "64k") as out:
        old = pd.DataFrame({"row_id": ["1.2_C1"], "fractured": [0.5]})
        path = write_csv_atomic(old, out / "submission.csv")
        before = path.read_bytes()
        big = pd.DataFrame({"row_id": [f"1.2.{i}_C1" for i in range(20_000)], "fractured": 0.25})
        with pytest.raises(OSError) as err:
            write_csv_atomic(big, path)
        assert err.value.errno == ENOSPC
        assert path.read_bytes() == before and [p.name for p in out.iterdir()] == ["submission.csv"]


def test_json_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "steps.json"
    write_json_atomic(path, {"a": 1})

    def no_space(fd: int) -> None:  # the data reached the temp file, then the disk filled up
        raise OSError(ENOSPC, os.strerror(ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as err:
        write_json_atomic(path, {"a": 2, "b": list(range(100))})
    assert err.value.errno == ENOSPC
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}


def test_json_on_a_real_full_disk_leaves_no_temp_file(tmp_path):
    with mounted_tmpfs(tmp_path / "out", "16k") as out:
        write_json_atomic(out / "run_info.json", {"a": 1})
        with pytest.raises(OSError):
            write_json_atomic(out / "run_info.json", {"big": "x" * 100_000})
        assert json.loads((out / "run_info.json").read_text()) == {"a": 1}
        assert [p.name for p in out.iterdir()] == ["run_info.json"]


# ----------------------------------------------------------------------------------- decoder crashes


def test_decoder_crashes_during_preprocess_fall_back_and_the_run_goes_on(small_root, tmp_path, monkeypatch):
    index = RsnaIndex.from_root(small_root)
    params = CacheParams(image_size=None)
    reference = preprocess(index, tmp_path / "ref", params, workers=1, progress=False)
    assert reference.ok
    monkeypatch.setenv(decode_pool.CRASH_TEST_ENV, "*")  # every dicomsdl worker dies on its first slice
    shutdown_decoders()
    crashed = preprocess(index, tmp_path / "crash", params, workers=1, progress=False)
    assert any(not w.alive() for w in decode_pool.get_pool().workers), "the crash hook killed no worker"
    assert crashed.ok and sorted(crashed.built) == sorted(reference.built)
    for entry in _entries(tmp_path / "ref"):
        other = CachedStudy(tmp_path / "crash" / entry.name)
        np.testing.assert_array_equal(other.volume, CachedStudy(entry).volume)
        assert other.meta["metadata"]["dropped_files"] == []
    monkeypatch.delenv(decode_pool.CRASH_TEST_ENV)
    shutdown_decoders()


# -------------------------------------------------------------------------- preprocess killed mid-way


def _wait_for_entries(cache: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len([p for p in _entries(cache) if (p / "meta.json").exists()]) >= n:
            return
        time.sleep(0.05)


def _kill(processes: list[psutil.Process]) -> None:
    """Kill the given processes (only ones this test started) and wait for them."""
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(processes, timeout=10)


def _preprocess_cli(root: Path, cache: Path, run_dir: Path) -> subprocess.Popen:
    args = [f"data.root={root}", f"data.cache_dir={cache}", "data.image_size=64", "workers=2",
            f"hydra.run.dir={run_dir}", "progress=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "cervspine.preprocess", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_parallel_preprocess_killed_midway_resumes_cleanly(tiny_root, tmp_path):
    cache = tmp_path / "c"
    proc = _preprocess_cli(tiny_root, cache, tmp_path / "run")
    _wait_for_entries(cache, 3, proc)
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _kill(family)  # see test_killed_parallel_preprocess_leaves_no_orphan_process
    index = RsnaIndex.from_root(tiny_root)
    report = preprocess(index, cache, CacheParams(image_size=64), workers=2, progress=False)
    total = len(index.train_uids) + len(index.test_uids)
    assert report.ok and len(report.built) + len(report.skipped) == total and report.skipped
    _assert_complete(cache)


@pytest.mark.slow
def test_killed_parallel_preprocess_leaves_no_orphan_process(tiny_root, tmp_path):
    cache = tmp_path / "c"
    proc = _preprocess_cli(tiny_root, cache, tmp_path / "run")
    _wait_for_entries(cache, 2, proc)
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"{len(alive)} processes outlived the killed preprocess"
    finally:
        _kill(family)


def test_kill_between_the_two_renames_of_a_rebuild(small_root, tmp_path):
    """Killed after the old entry became .stale-* and before .tmp-* took its place: the next run rebuilds."""
    index = RsnaIndex.from_root(small_root)
    cache, uid = tmp_path / "c", index.train_uids[0]
    entry = build_entry(uid, index.study_dir(uid), None, cache, CacheParams(image_size=32), "train")
    entry.rename(cache / f".stale-{uid}-4242")
    (cache / f".tmp-{uid}-4243").mkdir()
    (cache / f".tmp-{uid}-4243" / "volume.npy").write_bytes(b"\x93NUMPY half")
    report = preprocess(index, cache, CacheParams(image_size=32), workers=1, progress=False)
    assert report.ok and uid in report.built
    _assert_complete(cache)
