"""Memory: peak resident memory of predicting one study and of preprocessing one study.

Each measurement runs in a fresh interpreter; the resident set of that process (plus its decoder
subprocesses) is sampled every 2 ms in a thread (``getrusage`` maxrss is reported alongside).

* predict: ``load_study`` → ``InMemoryStudy`` → both demo stages → aggregation on the 512×512×350 study,
  the whole process (torch, both models) included; baseline: the naive notebook pipeline (pydicom loader
  with a float64 volume, per-slice loop) in the same kind of process.
* preprocess: ``cache.build_entry`` of one 512² study with its segmentation (cache 256², the configs'
  default); baseline: the same with the whole-volume forms of ``cached_volume`` and ``spine_boxes``
  (``cache._cached_volume_reference``, ``cache._spine_boxes_reference``: the code before issue 7).

    python -m experiments.benchmarks.memory [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from experiments.benchmarks.common import (
    ROOT,
    Row,
    bench_study,
    cli,
    command,
    demo_checkpoints,
    finish,
    rsna_folder,
)

GOAL_GB = 3.0


def _child(kind: str, variant: str) -> dict:
    """Run in a fresh interpreter (see :func:`measure`)."""
    import dataclasses
    import gc
    import resource
    import shutil
    import tempfile

    from cervspine.cache import entry as cache
    from experiments.benchmarks.common import PeakRSS

    if variant == "before":  # the whole-volume forms (before issue 7)
        cache.cached_volume = cache._cached_volume_reference
        cache.spine_boxes = cache._spine_boxes_reference
    if kind == "predict":
        import torch

        from cervspine.cache import CacheParams, InMemoryStudy
        from cervspine.inference import Predictor
        from cervspine.io import load_study
        from experiments.benchmarks.inference import naive_stages
        from experiments.benchmarks.loading import naive_load

        torch.set_num_threads(1)
        folder = bench_study("explicit")
        ckpts = demo_checkpoints(rsna_folder(8, 256, (100, 140)))
        predictor = Predictor.from_checkpoints(ckpts["stage1"], ckpts["stage2"], device="cpu", num_threads=1)
        params = CacheParams(image_size=predictor.image_size)
        template = dataclasses.replace(load_study(folder), volume=None) if variant == "naive" else None
        volume_bytes = None
        gc.collect()
        with PeakRSS(children=True) as rss:
            if variant == "naive":
                study = dataclasses.replace(template, volume=naive_load(folder))
                naive_stages(predictor, InMemoryStudy(study, params))
            else:
                study = load_study(folder)
                predictor.predict(InMemoryStudy(study, params))
            volume_bytes = study.volume.size * 2
    else:
        from cervspine.io.rsna import RsnaIndex

        root = rsna_folder(3, 512, (250, 300), uncompressed=True)
        index = RsnaIndex.from_root(root, exclude=())
        uid = index.uids_with_segmentation[0]
        out = Path(tempfile.mkdtemp(prefix="bench-memory-"))
        try:
            import cervspine.io  # noqa: F401  (imports are not part of a study's memory)

            gc.collect()
            with PeakRSS(children=True) as rss:
                entry = cache.build_entry(
                    uid,
                    index.study_dir(uid),
                    index.segmentation_path(uid),
                    out,
                    cache.CacheParams(image_size=256),
                    "train",
                )
            z, h, w = json.loads((entry / "meta.json").read_text())["original_shape"]
            volume_bytes = z * h * w * 2
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return {
        "peak": rss.peak,
        "delta": rss.delta,
        "children_peak": rss.peak_children,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "volume_bytes": volume_bytes,
    }


def in_memory_study_peaks() -> dict[str, int]:
    """tracemalloc peak (bytes) of building InMemoryStudy from a loaded 512² study, with the current
    ``cached_volume`` and with the whole-volume form it replaced (numpy allocations are traced)."""
    import tracemalloc

    from cervspine.cache import entry as cache
    from cervspine.io import load_study

    study = load_study(bench_study("explicit"))
    params = cache.CacheParams(image_size=128)  # the demo configs' cache size
    out = {}
    for name, fn in (("after", cache.cached_volume), ("before", cache._cached_volume_reference)):
        tracemalloc.start()
        fn(study, params)
        out[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out


def measure(kind: str, variant: str) -> dict:
    code = (
        "import json, sys; from experiments.benchmarks.memory import _child; "
        "print('RESULT' + json.dumps(_child(sys.argv[1], sys.argv[2])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, kind, variant], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    cmd = command("memory", args.quick)
    bench_study("explicit"), rsna_folder(3, 512, (250, 300), uncompressed=True)  # made before measuring
    demo_checkpoints(rsna_folder(8, 256, (100, 140)))
    ours, naive = measure("predict", "ours"), measure("predict", "naive")
    cache_form = in_memory_study_peaks()
    after, before = measure("preprocess", "after"), measure("preprocess", "before")
    total = ours["peak"] + ours["children_peak"]
    rows = [
        Row(
            "memory",
            "predict one 512×512×350 study, peak RSS of the whole process (GiB; torch + both demo models)",
            total / 2**30,
            "GiB",
            "naive pipeline (pydicom loader, float64 volume, per-slice loop)",
            (naive["peak"] + naive["children_peak"]) / 2**30,
            goal=f"≤{GOAL_GB:g} GB",
            met=total <= GOAL_GB * 1e9,
            command=cmd,
            lower_is_better=True,
            note=f"rise during the call {gib(ours['delta'])} (naive {gib(naive['delta'])}); int16 volume "
            f"{gib(ours['volume_bytes'])}; maxrss {gib(ours['maxrss'])} (naive {gib(naive['maxrss'])}). "
            f"Building the cache form (InMemoryStudy, tracemalloc peak beyond the loaded volume): "
            f"{cache_form['after'] / 2**20:.0f} MiB, {cache_form['before'] / 2**20:.0f} MiB with the "
            "whole-volume clip before issue 7",
        ),
        Row(
            "memory",
            "preprocess one 512² study + segmentation (build_entry, cache 256²), peak RSS rise (GiB)",
            after["delta"] / 2**30,
            "GiB",
            "before: whole-volume clip and spine_boxes masks",
            before["delta"] / 2**30,
            goal="—",
            command=cmd,
            lower_is_better=True,
            note=f"int16 volume {gib(after['volume_bytes'])}: rise = "
            f"{after['delta'] / after['volume_bytes']:.2f}× the volume (before "
            f"{before['delta'] / before['volume_bytes']:.2f}×); process peak "
            f"{gib(after['peak'])} (before {gib(before['peak'])})",
        ),
    ]
    extra = {"predict": ours, "naive": naive, "cache_form": cache_form, "preprocess": after}
    finish(rows, args.json, extra={**extra, "preprocess_before": before})


if __name__ == "__main__":
    main()
