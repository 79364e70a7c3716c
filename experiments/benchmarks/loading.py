"""Loading: ``load_study`` vs the naive loader every notebook writes, and preprocess throughput.

Same 512×512×350 study (int16, 0.625 mm), uncompressed and JPEG Lossless, in the same process,
interleaved; identical output is asserted. Peak memory of each loader is measured in a fresh
subprocess (tracemalloc, and the process RSS delta sampled in a thread; decode workers are separate
processes and are reported apart). Preprocess throughput: studies/minute of ``cervspine.preprocess`` with
1 and 2 workers on a small RSNA folder (8 studies at 256², cache at 128² as in the demo experiments).

    python -m experiments.benchmarks.loading [--quick]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.benchmarks.common import (
    ROOT,
    Row,
    bench_study,
    cli,
    command,
    finish,
    interleaved,
    median,
    rsna_folder,
)

SYNTAXES = {"explicit": "uncompressed (explicit VR LE)", "jpeg_lossless": "JPEG Lossless SV1"}
GOALS = {"explicit": 2.0, "jpeg_lossless": 3.0}


def naive_load(folder: str | Path) -> np.ndarray:
    """What the notebooks do: dcmread every file, sort by ImagePositionPatient z, pixel_array, rescale to
    HU, np.stack (float64, as ``pixel_array * slope + intercept`` gives)."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in sorted(Path(folder).iterdir())]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]), reverse=True)  # superior first
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])


# ------------------------------------------------------------------------------ memory (subprocess)


def _memory_child(loader: str, folder: str) -> dict:
    """Run in a fresh interpreter: one load with RSS sampling, then (load_study) one under tracemalloc."""
    import gc
    import tracemalloc

    import pydicom  # noqa: F401  (imports are not part of a load's memory)

    from cervspine.io import dicom as dicom_io
    from cervspine.io import load_study
    from cervspine.io.dicom import shutdown_decoders
    from experiments.benchmarks.common import PeakRSS

    def run():
        return load_study(folder).volume if loader == "load_study" else naive_load(folder)

    pydicom.dcmread(next(Path(folder).iterdir()))  # pydicom's lazy imports and handlers
    if loader == "load_study":
        dicom_io._dicomsdl_available()
    gc.collect()
    t0 = time.perf_counter()
    with PeakRSS(children=True) as rss:
        vol = run()
    cold_s = time.perf_counter() - t0
    nbytes, int16_bytes = vol.nbytes, vol.size * 2
    del vol
    gc.collect()
    traced_peak = None
    if loader == "load_study":  # (the naive loader under tracemalloc takes minutes: RSS only)
        tracemalloc.start()
        vol = run()  # noqa: F841  (held while the peak is read)
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    shutdown_decoders()
    return {
        "rss_delta": rss.delta,
        "rss_peak": rss.peak,
        "children_peak_rss": rss.peak_children,
        "tracemalloc_peak": traced_peak,
        "output_bytes": nbytes,
        "volume_int16_bytes": int16_bytes,
        "cold_s": cold_s,
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def memory(loader: str, folder: Path) -> dict:
    code = (
        "import json, sys; from experiments.benchmarks.loading import _memory_child; "
        "print('RESULT' + json.dumps(_memory_child(sys.argv[1], sys.argv[2])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, loader, str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:])


# ------------------------------------------------------------------------------------------ speed


def loader_rows(ts: str, repeats: int, quick: bool) -> list[Row]:
    from cervspine.io import load_study

    folder = bench_study(ts)
    ours, theirs = load_study(folder).volume, naive_load(folder)
    assert np.array_equal(ours, theirs), f"{ts}: load_study and the naive loader disagree"
    shape = ours.shape
    del ours, theirs
    times = interleaved(
        {"load_study": lambda: load_study(folder), "naive": lambda: naive_load(folder)}, repeats, warmup=0
    )
    fast, slow = median(times["load_study"]), median(times["naive"])
    cmd = command("loading", quick)
    label = SYNTAXES[ts]
    rows = [
        Row(
            "loading",
            f"load_study, {label}, {shape[1]}×{shape[2]}×{shape[0]} (s/study, warm decoder pool)",
            fast,
            "s",
            "naive pydicom loader",
            slow,
            goal=f"≥{GOALS[ts]:g}× faster, identical output",
            met=slow / fast >= GOALS[ts],
            command=cmd,
            lower_is_better=True,
            note=f"np.array_equal(load_study, naive) asserted; {repeats} interleaved repeats, medians; "
            f"all load_study {[round(t, 2) for t in times['load_study']]}, naive "
            f"{[round(t, 2) for t in times['naive']]}",
        )
    ]
    mem = {name: memory(name, folder) for name in ("load_study", "naive")}
    ours_m, naive_m = mem["load_study"], mem["naive"]
    vol = ours_m["volume_int16_bytes"]
    worst = max(ours_m["rss_delta"], ours_m["tracemalloc_peak"])
    rows.append(
        Row(
            "loading",
            f"load_study peak memory, {label} (MiB; max of tracemalloc peak and RSS delta)",
            worst / 2**20,
            "MiB",
            "int16 volume",
            vol / 2**20,
            goal="≤2× the volume",
            met=worst <= 2 * vol,
            command=cmd,
            ratio_override=worst / vol,
            note=f"ratio = peak ÷ volume. tracemalloc {mib(ours_m['tracemalloc_peak'])}, RSS delta "
            f"{mib(ours_m['rss_delta'])} (fresh process, first load {ours_m['cold_s']:.2f} s incl. decoder "
            f"start); decode workers (separate processes) peak RSS {mib(ours_m['children_peak_rss'])} in "
            f"all. Naive loader: RSS delta {mib(naive_m['rss_delta'])} (float64 output "
            f"{mib(naive_m['output_bytes'])}).",
            extra={"load_study": ours_m, "naive": naive_m},
        )
    )
    return rows


# ------------------------------------------------------------------------------------- preprocess


def preprocess_rows(repeats: int, quick: bool) -> list[Row]:
    from cervspine.cache import CacheParams, preprocess
    from cervspine.io.dicom import shutdown_decoders
    from cervspine.io.rsna import RsnaIndex

    root = rsna_folder(8, 256, (100, 140))
    index = RsnaIndex.from_root(root, exclude=())
    n = len(index.train_uids) + len(index.test_uids)
    params = CacheParams(image_size=128)
    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))

    def run(workers: int):
        cache = tmp / f"w{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        shutdown_decoders()  # every run starts its decoder subprocesses, as a command-line run does
        report = preprocess(index, cache, params, workers=workers, progress=False)
        assert report.ok and len(report.built) == n, report.failed

    try:
        times = interleaved({"1": lambda: run(1), "2": lambda: run(2)}, repeats, warmup=0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    one, two = (60 * n / median(times[k]) for k in ("1", "2"))
    return [
        Row(
            "loading",
            f"preprocess throughput, 2 workers ({n} studies 256²×100–140 slices, mixed transfer syntaxes, "
            "cache 128²; studies/min)",
            two,
            "studies/min",
            "1 worker",
            one,
            goal="—",
            command=command("loading", quick),
            note=f"{repeats} interleaved repeats each, medians; a fresh cache folder and no running decoder "
            f"subprocess at the start of every run; {median(times['1']) / n:.2f} s per study with 1 worker. "
            "With 2, each worker process starts its own 2 decoder subprocesses for the compressed studies "
            "(up to 4 decoders and 2 workers on 2 shared cores)",
        )
    ]


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    repeats = 3 if args.quick else 5
    rows: list[Row] = []
    for ts in SYNTAXES:
        rows += loader_rows(ts, repeats, args.quick)
    rows += preprocess_rows(1 if args.quick else 2, args.quick)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
