"""Inference: end-to-end latency of predicting one 512×512×350 study on this CPU, per phase.

load DICOM (``load_study``) → the cache form in memory (``InMemoryStudy``) → stage 1 → stage 2 →
aggregation, with the demo stages (architectures and input sizes from conf/experiment/*_demo.yaml;
weights from a few training batches: quality does not matter for latency). Baseline: the naive
per-slice loop a notebook writes (pydicom loader; one slice at a time through each stage, windowing
each slice's stack again, ``torch.no_grad`` with batch 1). Variants of the Predictor (torch threads,
channels_last, bf16) are interleaved with it in the same process; medians of the repeats.

    python -m experiments.benchmarks.inference [--quick]
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import torch

from experiments.benchmarks.common import (
    Row,
    bench_study,
    cli,
    command,
    demo_checkpoints,
    finish,
    interleaved,
    median,
    rsna_folder,
)

GOAL_S = 6.4  # a published clinical evaluation of a leading model of this competition: 6.4 s per exam
PHASES = ("load", "preprocess", "stage1", "stage2", "aggregate")


def naive_stages(predictor, study) -> tuple[np.ndarray, dict[str, float]]:
    """Both stages one slice at a time, as a notebook loop does (same inputs as the Predictor's)."""
    from cervspine.data.metadata import slice_features, study_features
    from cervspine.data.spine import crop_pixels, crop_track
    from cervspine.data.transforms import resize_hwc, window_stack
    from cervspine.scoring.aggregation import aggregate_slices

    member = predictor.stage2[0]
    d1, d2, spec = predictor.stage1.stack, member.stack, member.spec
    s1, s2 = predictor.stage1.model, member.model
    n, t = study.num_slices, {}

    def chw(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]

    t0 = time.perf_counter()
    vis, boxes = np.zeros((n, 7), np.float32), np.zeros((n, 4), np.float32)
    with torch.no_grad():
        for z in range(n):
            img = resize_hwc(window_stack(study.slices(z + d1.offsets), d1.hu_windows), d1.input_size)
            logits, box = s1(chw(img))
            vis[z], boxes[z] = torch.sigmoid(logits)[0].numpy(), box[0].numpy()
    boxes[vis.max(axis=1) < 0.5] = np.nan
    t["stage1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vis = spec.visibility(vis)  # as the Predictor does before stage 2
    zs = np.flatnonzero(vis.max(axis=1) >= spec.visible_threshold)
    crops = crop_track(boxes, margin=spec.crop_margin, min_size=spec.min_crop)
    sf = study_features(study.meta)
    h, w = study.volume.shape[1:]
    probs = []
    with torch.no_grad():
        for z in zs:
            y0, x0, y1, x1 = crop_pixels(crops[z], h, w)
            hu = np.asarray(study.volume[np.clip(z + d2.offsets, 0, n - 1), y0:y1, x0:x1])
            img = resize_hwc(window_stack(hu, d2.hu_windows), d2.input_size)
            meta = np.concatenate([slice_features(int(z), n, vis[z]), sf]).astype(np.float32)
            out = s2(chw(img), torch.from_numpy(meta)[None])
            probs.append(torch.sigmoid(out["fracture"])[0].numpy())
    t["stage2"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    agg, _ = aggregate_slices(np.stack(probs), vis[zs], np.zeros(len(zs)), zs, **member.aggregation)
    t["aggregate"] = time.perf_counter() - t0
    return agg[0], t


def main() -> None:
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.inference import Predictor, torch_threads
    from cervspine.io import load_study
    from experiments.benchmarks.loading import naive_load

    args = cli(__doc__.splitlines()[0])
    repeats = 1 if args.quick else 2
    folder = bench_study("explicit")
    ckpts = demo_checkpoints(rsna_folder(8, 256, (100, 140)))
    default_threads = torch.get_num_threads()

    def predictor(**kw) -> Predictor:
        return Predictor.from_checkpoints(ckpts["stage1"], ckpts["stage2"], device="cpu", **kw)

    variants: dict[str, dict[str, Any]] = {
        "fp32, 1 thread": dict(num_threads=1),
        f"fp32, torch default threads ({default_threads})": dict(num_threads=None),
        "fp32 channels_last, 1 thread": dict(num_threads=1, channels_last=True),
        "bf16, 1 thread": dict(num_threads=1, precision="bf16"),
        "bf16 channels_last, 1 thread": dict(num_threads=1, precision="bf16", channels_last=True),
    }
    if args.quick:  # the Predictor as the benchmark's base and the naive loop only
        variants = {"fp32, 1 thread": variants["fp32, 1 thread"]}
    predictors = {name: predictor(**kw) for name, kw in variants.items()}
    size = predictors["fp32, 1 thread"].image_size
    params = CacheParams(image_size=size)
    template = load_study(folder)  # geometry + metadata for the naive path's InMemoryStudy

    records: dict[str, list[dict[str, float]]] = {}
    finals: dict[str, np.ndarray] = {}

    def ours(name: str) -> None:
        t0 = time.perf_counter()
        study = load_study(folder)
        t1 = time.perf_counter()
        cached = InMemoryStudy(study, params)
        t2 = time.perf_counter()
        pred = predictors[name].predict(cached)
        records.setdefault(name, []).append({"load": t1 - t0, "preprocess": t2 - t1, **pred.timings})
        finals[name] = pred.probabilities

    def naive() -> None:
        with torch_threads(1):
            t0 = time.perf_counter()
            study = dataclasses.replace(template, volume=naive_load(folder))
            t1 = time.perf_counter()
            cached = InMemoryStudy(study, params)
            t2 = time.perf_counter()
            final, t = naive_stages(predictors["fp32, 1 thread"], cached)
        records.setdefault("naive", []).append({"load": t1 - t0, "preprocess": t2 - t1, **t})
        finals["naive"] = final

    calls = {"naive": naive, **{name: (lambda n=name: ours(n)) for name in variants}}
    load_before = os.getloadavg()[0]
    times = interleaved(calls, repeats, warmup=1)
    load_after = os.getloadavg()[0]
    for name in records:  # drop the warm-up call's phases
        records[name] = records[name][1:]
    total = {name: median(ts) for name, ts in times.items()}
    phase = {name: {p: median([r[p] for r in recs]) for p in PHASES} for name, recs in records.items()}
    diff = {name: float(np.abs(finals[name] - finals["fp32, 1 thread"]).max()) for name in finals}

    cmd = command("inference", args.quick)
    base = "fp32, 1 thread"
    shape = template.volume.shape
    d1, d2 = predictors[base].stage1.stack, predictors[base].stage2[0].stack
    context = (
        f"{shape[1]}×{shape[2]}×{shape[0]} uncompressed study; stage inputs {d1.input_size}² and "
        f"{d2.input_size}² (demo configs), cache {size}²; {repeats} interleaved repeats, medians; "
        f"load average {load_before:.1f} → {load_after:.1f} on {os.cpu_count()} CPUs"
    )
    phases_txt = lambda n: ", ".join(f"{p} {phase[n][p]:.2f}" for p in PHASES)  # noqa: E731
    rows = [
        Row(
            "inference",
            f"predict one study end to end, {base} (s)",
            total[base],
            "s",
            "naive per-slice loop, 1 thread",
            total["naive"],
            goal=f"≤{GOAL_S} s per study",
            met=total[base] <= GOAL_S,
            command=cmd,
            lower_is_better=True,
            note=f"{context}. Phases (s): {phases_txt(base)}; naive: {phases_txt('naive')}. "
            f"max |Δp| naive vs Predictor {diff['naive']:.1e}",
        )
    ]
    for name in variants:
        if name == base:
            continue
        rows.append(
            Row(
                "inference",
                f"predict one study end to end, {name} (s)",
                total[name],
                "s",
                base,
                total[base],
                goal=f"≤{GOAL_S} s per study",
                met=total[name] <= GOAL_S,
                command=cmd,
                lower_is_better=True,
                note=f"phases (s): {phases_txt(name)}; max |Δp| of the 8 probabilities vs {base}: "
                f"{diff[name]:.1e}",
            )
        )
    for p in PHASES:
        rows.append(
            Row(
                "inference",
                f"phase {p}, {base} (s)",
                phase[base][p],
                "s",
                "naive loop's " + p,
                phase["naive"][p],
                goal="—",
                command=cmd,
                lower_is_better=True,
            )
        )
    finish(rows, args.json, extra={"times": times, "phases": phase, "max_abs_diff": diff})


if __name__ == "__main__":
    main()
