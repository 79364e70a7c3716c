"""Shared helpers of the CPU benchmarks: machine description, interleaved timing, peak memory, rows, data.

Every figure is a ratio against a baseline measured in the same process run (this machine's cores are
shared with other jobs, so absolute seconds drift from run to run): candidate and baseline are
interleaved (A B, B A, A B …), repeated, and the medians are compared.

Generated inputs (DICOM studies, small RSNA folders, briefly trained demo checkpoints) are kept under
``data/bench/`` (git-ignored) and made once; their names carry their parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cervspine.config import composed as hydra_config

ROOT = Path(__file__).resolve().parents[2]
BENCH_DATA = Path(os.environ.get("CERVSPINE_BENCH_DATA", ROOT / "data" / "bench"))
CONF = ROOT / "conf"


# ------------------------------------------------------------------------------------------ results


@dataclass
class Row:
    """One line of RESULTS.md: ``value`` of the candidate, ``baseline`` value, ratio = value / baseline
    (or baseline / value when ``lower_is_better``, so that a ratio > 1 always favours the candidate)."""

    benchmark: str
    figure: str
    value: float
    unit: str
    baseline_name: str
    baseline: float | None
    goal: str = ""
    met: bool | None = None
    command: str = ""
    lower_is_better: bool = False
    note: str = ""
    ratio_override: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.ratio_override is not None:
            return self.ratio_override
        if self.baseline is None or not self.value or not self.baseline:
            return None
        return self.baseline / self.value if self.lower_is_better else self.value / self.baseline

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    elif abs(x) >= 0.01:
        s = f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
    else:
        s = f"{x:.2e}"
    return f"{s} {unit}".strip()


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
        met = "" if r.met is None else ("met" if r.met else "NOT met")
        base = f"{r.baseline_name} {fmt(r.baseline, r.unit)}" if r.baseline_name else ""
        print(f"[{r.benchmark}] {r.figure}: {fmt(r.value, r.unit)} | {base} | {ratio} | {r.goal} {met}")
        if r.note:
            print(f"    {r.note}")
    sys.stdout.flush()


def cli(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller inputs and fewer repeats (a smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    return ap.parse_args()


def command(module: str, quick: bool) -> str:
    return f"python -m experiments.benchmarks.{module}" + (" --quick" if quick else "")


def finish(rows: list[Row], json_path: Path | None, extra: dict[str, Any] | None = None) -> None:
    print_rows(rows)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"rows": [r.as_dict() for r in rows], "extra": extra or {}}
        json_path.write_text(json.dumps(payload, indent=2, default=str))


# ------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import numpy as np
    import psutil
    import torch

    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------ timing


def interleaved(
    candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each callable, interleaved and alternating order every round."""
    names = list(candidates)
    for _ in range(warmup):
        for n in names:
            candidates[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            candidates[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class PeakRSS:
    """Peak resident memory (bytes) of this process (+ its children when ``children``), sampled in a
    thread every ``interval`` s; ``delta`` is the peak minus the RSS at entry."""

    def __init__(self, interval: float = 0.002, children: bool = False):
        import psutil

        self.proc = psutil.Process()
        self.interval, self.children = interval, children
        self.start = self.peak = self.peak_children = 0
        self._stop = threading.Event()

    def _rss(self) -> tuple[int, int]:
        own = self.proc.memory_info().rss
        kids = 0
        if self.children:
            for c in self.proc.children(recursive=True):
                with contextlib.suppress(Exception):
                    kids += c.memory_info().rss
        return own, kids

    def _run(self) -> None:
        while not self._stop.is_set():
            own, kids = self._rss()
            self.peak = max(self.peak, own)
            self.peak_children = max(self.peak_children, kids)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start, _ = self._rss()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        own, kids = self._rss()
        self.peak, self.peak_children = max(self.peak, own), max(self.peak_children, kids)

    @property
    def delta(self) -> int:
        return self.peak - self.start


# ------------------------------------------------------------------------------------------ data


def _stamp(path: Path) -> Path:
    """A sibling file that marks ``path`` complete (not inside: a study folder must hold slices only)."""
    return path.with_name(f"{path.name}.complete")


@contextlib.contextmanager
def _building(path: Path) -> Iterator[Path]:
    """Build ``path`` in a temporary sibling and move it into place (a killed run leaves no half data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        _stamp(path).touch()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_study(
    transfer_syntax: str, *, size: int = 512, n_slices: int = 350, seed: int = 0, slice_spacing: float = 0.625
) -> Path:
    """One realistic 512×512×350 study (int16, slices ``slice_spacing`` mm apart) written once under
    data/bench."""
    spacing = "" if slice_spacing == 0.625 else f"_{slice_spacing:g}mm"
    path = BENCH_DATA / f"study_{size}x{n_slices}{spacing}_{transfer_syntax}_s{seed}"
    if not _stamp(path).is_file():
        from cervspine.synthetic import write_study

        t0 = time.perf_counter()
        with _building(path) as tmp:
            write_study(
                tmp,
                seed=seed,
                size=size,
                n_slices=n_slices,
                slice_spacing=slice_spacing,
                transfer_syntax=transfer_syntax,
            )
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def rsna_folder(
    n_train: int, size: int, slices: tuple[int, int], *, seed: int = 0, uncompressed: bool = False
) -> Path:
    """A small RSNA-layout folder (every study segmented; half boxed), written once under data/bench."""
    tag = "unc" if uncompressed else "mixed"
    path = BENCH_DATA / f"rsna_{n_train}x{size}_{slices[0]}-{slices[1]}_{tag}_s{seed}"
    if not _stamp(path).is_file():
        from cervspine.synthetic import write_rsna_folder

        quirks = {"transfer_syntax": {"explicit": 1.0}} if uncompressed else None
        t0 = time.perf_counter()
        with _building(path) as tmp:
            write_rsna_folder(
                tmp,
                n_train=n_train,
                n_test=0,
                size=size,
                slices=slices,
                seed=seed,
                seg_fraction=1.0,
                box_fraction=0.5,
                quirks=quirks,
                workers=2,
            )
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def config_key(*files: str | Path) -> str:
    """A short hash of config files' contents (names a cached artefact derived from them)."""
    h = hashlib.sha1()
    for f in files:
        p = CONF / f if not Path(f).is_absolute() else Path(f)
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


DEMO_STAGES = {"stage1": "vertebrae_demo", "stage2": "fracture_demo"}


def demo_checkpoints(root: Path, quiet: bool = True) -> dict[str, Path]:
    """The two demo stages trained for a few batches on ``root`` (weights' quality does not matter here;
    architectures and input sizes come from the experiments' configs). Made once per config version."""
    files = [f"experiment/{e}.yaml" for e in DEMO_STAGES.values()]
    files += ["model/vertebrae.yaml", "model/fracture.yaml", "data/vertebrae.yaml", "data/fracture.yaml"]
    run = BENCH_DATA / f"demo_ckpts_{root.name}_{config_key(*files)}"
    out = {s: run / s / "checkpoints" / "last.ckpt" for s in DEMO_STAGES}
    if _stamp(run).is_file() and all(p.is_file() for p in out.values()):
        return out
    from cervspine.train import train

    t0 = time.perf_counter()
    shutil.rmtree(run, ignore_errors=True)
    _stamp(run).unlink(missing_ok=True)
    short = [
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "data.num_workers=0",
        "data.n_folds=4",
        "logger=csv",
        "print_config=false",
    ]
    for stage, experiment in DEMO_STAGES.items():
        overrides = [f"experiment={experiment}", f"data.root={root}", *short]
        with hydra_config("train", overrides, run / stage) as cfg, _quiet(quiet):
            train(cfg)
    _stamp(run).touch()
    print(f"trained the demo stages for a few batches in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    import logging
    import warnings

    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(level)
