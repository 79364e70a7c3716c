"""Building the cache for an RSNA folder: every missing or stale entry, in parallel, resumable, by shard."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cervspine.cache.entry import build_entry, entry_is_current
from cervspine.cache.params import CacheParams, source_fingerprint
from cervspine.io.rsna import RsnaIndex

log = logging.getLogger(__name__)


@dataclass
class PreprocessReport:
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class _Job:
    uid: str
    study_dir: Path
    seg_path: Path | None
    split: str


def _parse_shard(shard: str | None) -> tuple[int, int]:
    if not shard:
        return 0, 1
    i, n = (int(x) for x in str(shard).split("/"))
    if not 0 <= i < n:
        raise ValueError(f"shard must be i/N with 0 <= i < N, got {shard!r}")
    return i, n


def list_jobs(index: RsnaIndex, splits: tuple[str, ...] = ("train", "test")) -> list[_Job]:
    jobs = []
    if "train" in splits:
        jobs += [_Job(u, index.study_dir(u), index.segmentation_path(u), "train") for u in index.train_uids]
    if "test" in splits:
        jobs += [_Job(u, index.study_dir(u), None, "test") for u in index.test_uids]
    return jobs


def _run_job(job: _Job, cache_dir: Path, params: CacheParams) -> str:
    build_entry(job.uid, job.study_dir, job.seg_path, cache_dir, params, job.split)
    return job.uid


def preprocess(
    index: RsnaIndex,
    cache_dir: Path,
    params: CacheParams,
    *,
    workers: int = 2,
    shard: str | None = None,
    splits: tuple[str, ...] = ("train", "test"),
    progress: bool = True,
) -> PreprocessReport:
    """Build every missing or stale cache entry of ``index``; failures are collected, not raised."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    i, n = _parse_shard(shard)
    if n == 1:  # leftovers of a killed run; with shards another node may be writing
        for leftover in [*cache_dir.glob(".tmp-*"), *cache_dir.glob(".stale-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    jobs = sorted(list_jobs(index, splits), key=lambda j: j.uid)[i::n]
    report = PreprocessReport()
    todo = []
    for job in jobs:
        try:
            fingerprint = source_fingerprint(job.study_dir, job.seg_path, params)
        except OSError as e:  # a missing or unreadable study folder fails that study alone
            report.failed[job.uid] = f"{type(e).__name__}: {e}"
            continue
        if entry_is_current(cache_dir / job.uid, fingerprint):
            report.skipped.append(job.uid)
        else:
            todo.append(job)
    if report.skipped:
        _note_storage(cache_dir / report.skipped[0], params)
    columns = (TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("studies", total=len(todo))
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                _record(report, job, lambda j=job: _run_job(j, cache_dir, params))
                bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent) as pool:
                futures = {pool.submit(_run_job, job, cache_dir, params): job for job in todo}
                for fut in as_completed(futures):
                    _record(report, futures[fut], fut.result)
                    bar.advance(task)
    return report


def _note_storage(entry: Path, params: CacheParams) -> None:
    """Say so when current entries are stored otherwise than this run asks: kept (a lossless codec
    changes no voxel), and how to re-store them."""
    try:
        stored = json.loads((entry / "meta.json").read_text()).get("storage", {}).get("volume", {})
    except (OSError, json.JSONDecodeError):
        return
    codec = stored.get("codec", "none")
    if codec != params.compression:
        log.warning(
            "%s: current entries are stored as %s, this run asks %s: kept (lossless storage, the same "
            "voxels); new entries are stored as %s. Delete the folder to re-store every entry",
            entry.parent,
            codec,
            params.compression,
            params.compression,
        )


def _die_with_parent() -> None:
    """Pool workers (and so their decoder subprocesses) end when the parent is killed (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _record(report: PreprocessReport, job: _Job, call) -> None:
    try:
        call()
        report.built.append(job.uid)
    except Exception as e:  # one bad study must not stop the others
        report.failed[job.uid] = f"{type(e).__name__}: {e}"
        log.error("failed %s (%s): %s", job.uid, job.study_dir, e)
