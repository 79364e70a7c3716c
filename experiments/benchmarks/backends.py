"""Backends: per-study seconds of the demo models and of the real-data recipes on this CPU, for torch eager
fp32 (the Predictor as today), torch bf16, ONNX Runtime, OpenVINO fp32 and OpenVINO bf16 (a bundle from
``cervspine.export``), each phase apart; and predict's default threads beside a CPU-heavy process.

Recipes (random init: ``model.backbone.pretrained=false``; weights do not change the time), built from the
composed train configs: demo = vertebrae_demo (ResNet-18, 96²) + fracture_demo (ResNet-18, 64²);
production = vertebrae_column (EfficientNet-B0 per slice at 192², 2 windows, BiGRU) + fracture_b5
(EfficientNet-B5 at 384², 5-slice stacks) or fracture_seq (EfficientNetV2-S at 384², 7 × 15 crops of
5 slices + box mask, BiGRU). Study: 512×512×300 slices 0.625 mm apart (synthetic DICOM).

Phases: load (DICOM → the cache form in memory), stage 1 (inputs + model), crops (stage-2 inputs), stage 2
(model). The numpy phases run once on the whole study (they are the same code for every backend); the
model phases are the median seconds of one call on a batch of the recipe's real input size, the backends
interleaved (A B C …, then reversed), times the study's number of such batches: every slice for the
per-slice stage 1, every ~2 mm position for the column (+ one reader call on the whole sequence), the
slices that show a level for the slice classifier (a stage-1 answer with C1–C7 over 200 slices, the
cervical spine's ~125 mm at 0.625 mm), 7 sequences for the sequence model.

    python -m experiments.benchmarks.backends [--quick]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmarks.common import (
    BENCH_DATA,
    Row,
    _building,
    _stamp,
    bench_study,
    cli,
    command,
    config_key,
    finish,
    hydra_config,
    interleaved,
    median,
)

GOAL_SPEEDUP, GOAL_S, KEPT = 1.5, 10.0, 1e-2
RECIPES = {
    "demo": ("vertebrae_demo", "fracture_demo"),
    "production": ("vertebrae_column", "fracture_b5", "fracture_seq"),
}
BACKENDS = ("torch fp32", "torch bf16", "onnxruntime fp32", "openvino fp32", "openvino bf16")
N_SLICES, SCORED = 300, (50, 250)  # the study; the slices stage 1 says show C1–C7 (200)


def recipe_checkpoint(experiment: str, folder: Path) -> Path:
    """A random-init checkpoint of a train recipe (its model and data settings, composed as train does)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cervspine.bundle.export import save_checkpoint

    overrides = [f"experiment={experiment}", "model.backbone.pretrained=false", "print_config=false"]
    with hydra_config("train", overrides, folder / "logs") as cfg:
        data_hp = OmegaConf.to_container(cfg.data, resolve=True)
        for key in ("_target_", "augment"):
            data_hp.pop(key, None)
        module = instantiate(cfg.model)
    return save_checkpoint(module.eval(), data_hp, folder / f"{experiment}.ckpt")


def bundles() -> dict[str, tuple[Path, list[Path]]]:
    """recipe → (bundle, [stage-1, stage-2 … checkpoints]), made once per version of the configs, of the
    graphs' code and of the manifest."""
    from cervspine.bundle import VERSION as BUNDLE_VERSION
    from cervspine.bundle import graphs as bundle_graphs

    out = {}
    for name, experiments in RECIPES.items():
        files = [f"experiment/{e}.yaml" for e in experiments] + [
            "model/fracture.yaml",
            "model/fracture_seq.yaml",
        ]
        code = [Path(bundle_graphs.__file__), Path(bundle_graphs.__file__).with_name("export.py")]
        key = config_key(*files, "model/vertebrae_column.yaml", *code)
        path = BENCH_DATA / f"bundle_{name}_v{BUNDLE_VERSION}_{key}"
        if not _stamp(path).is_file():
            from cervspine.bundle.export import export_bundle

            t0 = time.perf_counter()
            with _building(path) as tmp:
                ckpts = [recipe_checkpoint(e, tmp / "ckpts") for e in experiments]
                export_bundle(tmp / "bundle", ckpts[0], ckpts[1:])
            print(f"exported the {name} bundle in {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = (path / "bundle", [path / "ckpts" / f"{e}.ckpt" for e in experiments])
    return out


def stage1_answer(n: int) -> Any:
    """C1–C7 over slices SCORED (7 contiguous ranges), the spine box in the middle of the slice."""
    from cervspine.data.stage1_table import Stage1Output

    vis = np.zeros((n, 7), np.float32)
    lo, hi = SCORED
    for v, part in enumerate(np.array_split(np.arange(lo, hi), 7)):
        vis[part, v] = 0.9
    boxes = np.tile(np.float32([0.35, 0.35, 0.65, 0.65]), (n, 1))
    return Stage1Output(vis, boxes).masked()


class Engines:
    """The stages of one recipe on every backend: torch strategies (fp32 and bf16) and bundle stages."""

    def __init__(self, bundle: Path, ckpts: list[Path], threads: int, backends: tuple[str, ...]):
        from cervspine.bundle import BundlePredictor
        from cervspine.inference import Runtime, load_stage1, load_stage2

        self.stages, self.load_s, self.threads = {}, {}, threads
        for b in backends:
            t0 = time.perf_counter()
            if b.startswith("torch"):
                rt = Runtime.create("cpu", precision=b.split()[1], num_threads=threads)
                self.stages[b] = [load_stage1(ckpts[0], rt), *(load_stage2(c, rt) for c in ckpts[1:])]
            else:
                name, precision = b.split()
                p = BundlePredictor(bundle, backend=name, precision=precision, num_threads=threads)
                self.stages[b] = [p.stage1, *p.stage2]
            self.load_s[b] = time.perf_counter() - t0
        self.ref = self.stages[backends[0]]  # torch fp32: the inputs' settings, the outputs' reference

    def call(self, backend: str, index: int, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One forward pass of stage ``index``'s ``graph`` on ``backend``: numpy in, numpy out."""
        stage = self.stages[backend][index]
        if not backend.startswith("torch"):
            return [np.asarray(o, np.float32) for o in stage.graphs[graph](feeds)]
        import torch

        from cervspine.bundle import graphs as g

        wrap = {
            ("slice", "model", 0): g.SliceDetectorGraph,
            ("column", "encoder", 0): g.ColumnEncoderGraph,
            ("column", "reader", 0): g.ColumnReaderGraph,
            ("slice", "model", 1): g.SliceClassifierGraph,
            ("sequence", "model", 1): g.SequenceGraph,
        }[(stage.kind, graph, min(index, 1))]
        rt = stage.runtime
        with rt.threads(), torch.inference_mode(), rt.autocast():
            out = wrap(stage.model)(*(torch.from_numpy(v) for v in feeds.values()))
        out = [out] if isinstance(out, torch.Tensor) else out
        return [o.float().numpy() for o in out]


def one_sequence_graph(engines: Engines, index: int, backends: tuple[str, ...], folder: Path) -> None:
    """The sequence model's graph for one vertebra's sequence (the bundle's holds all 7: a call would take
    a minute here); its time × 7 is the study's."""
    import torch

    from cervspine.bundle.backends import open_graph
    from cervspine.bundle.graphs import GraphSpec, SequenceGraph, export_graph, plain

    stage = engines.ref[index]
    c = stage.cropper
    x = torch.rand(1, 1, 2, c.channels, c.input_size, c.input_size)  # the slice axis is dynamic
    path = folder / "sequence_1.onnx"
    if not path.is_file():
        inputs, dyn = {"image": x, "present": torch.ones(1, 1)}, {"image": {0: "batch", 2: "slices"}}
        export_graph(GraphSpec(SequenceGraph(plain(stage.model)), inputs, ["v"], dyn), path)
    for b in backends:
        if not b.startswith("torch"):
            name, precision = b.split()
            engines.stages[b][index].graphs["one"] = open_graph(path, name, precision, engines.threads)


def measure(
    name: str, bundle: Path, ckpts: list[Path], study: Any, threads: int, quick: bool, load_s: float
) -> list[Row]:
    from cervspine.data.column_sampler import spacing_mm
    from cervspine.data.slice_inputs import slice_batch, slice_inputs
    from cervspine.data.vertebra_crops import study_sequences
    from cervspine.data.windows import stack_slices, windowed_volume

    backends = BACKENDS[:3] if quick else BACKENDS
    eng = Engines(bundle, ckpts, threads, backends)
    s1 = eng.ref[0]
    phases: dict[str, dict[str, float]] = {b: {} for b in backends}
    numpy_s: dict[str, float] = {"load": load_s}
    calls: dict[
        str, tuple[int, str, dict[str, np.ndarray], float]
    ] = {}  # label → (stage, graph, feeds, per study)
    t0 = time.perf_counter()
    if s1.kind == "column":
        dz = spacing_mm(study)
        idx = s1.sampler.positions(study.num_slices, dz)
        x = s1.sampler.inputs(study.volume, idx, dz)
        numpy_s["stage1"] = time.perf_counter() - t0
        calls["stage 1 encoder"] = (0, "encoder", {"slices": x[:16]}, len(idx) / 16)
        feats = eng.call(backends[0], 0, "encoder", {"slices": x})[0]
        step = np.float32([s1.sampler.stride(dz) * dz])
        reader = {"features": feats[None], "lengths": np.int64([len(idx)]), "step_mm": step}
        calls["stage 1 reader"] = (0, "reader", reader, 1.0)
        n1 = f"{len(idx)} positions"
    else:
        win = windowed_volume(study.volume, s1.stack)
        x = stack_slices(win, np.arange(study.num_slices), s1.stack.offsets)
        numpy_s["stage1"] = time.perf_counter() - t0
        calls["stage 1"] = (0, "model", {"image": x[:32]}, study.num_slices / 32)
        n1 = f"{study.num_slices} slices"
    answer = stage1_answer(study.num_slices)
    detail = {}
    for i, member in enumerate(eng.ref[1:], start=1):
        t0 = time.perf_counter()
        if member.kind == "slice":
            inputs = slice_inputs(study, answer, member.spec, member.stack)
            imgs, metas, _ = slice_batch(inputs, inputs.slices, member.stack)
            batch = 8 if member.stack.input_size > 128 else 32
            per = len(inputs.slices) / batch
            calls[f"stage 2 [{i}]"] = (i, "model", {"image": imgs[:batch], "meta": metas[:batch]}, per)
            detail[i] = f"{len(inputs.slices)} slices at {member.stack.input_size}²"
        else:
            extents = member.cropper.extents_from_stage1(answer.visibility, answer.boxes)
            images, _, present = study_sequences(
                member.cropper, study.volume, extents, answer.visibility, answer.boxes
            )
            numpy_s[f"crops [{i}]"] = time.perf_counter() - t0
            one_sequence_graph(eng, i, backends, bundle.parent)
            feeds = {"image": images[None, :1], "present": present[None, :1].astype(np.float32)}
            calls[f"stage 2 [{i}]"] = (i, "one", feeds, 7.0)
            detail[i] = f"7 × {member.cropper.n_slices} crops at {member.cropper.input_size}²"
        numpy_s.setdefault(f"crops [{i}]", time.perf_counter() - t0)
    outputs: dict[str, dict[str, list[np.ndarray]]] = {b: {} for b in backends}

    def runner(b: str, label: str):
        stage, graph, feeds, _ = calls[label]
        if graph == "one" and b.startswith("torch"):
            graph = "model"  # the torch module takes one sequence as it is

        def run() -> None:
            outputs[b][label] = eng.call(b, stage, graph, feeds)

        return run

    repeats = 1 if quick else 2
    for label, (_, _, _, per_study) in calls.items():
        times = interleaved({b: runner(b, label) for b in backends}, repeats, warmup=1)
        for b in backends:
            phases[b][label] = median(times[b]) * per_study
        print(
            f"    {name} {label}: " + ", ".join(f"{b} {phases[b][label]:.2f} s" for b in backends), flush=True
        )
    return rows_of(name, eng, backends, phases, numpy_s, outputs, n1, detail, threads, quick)


def _delta(outputs: dict, b: str, ref: str) -> float:
    """max |Δ| of ``b``'s probabilities against ``ref``'s (the encoder's features are not probabilities)."""
    worst = 0.0
    for label, outs in outputs[b].items():
        if "encoder" in label:
            continue
        for o, r in zip(outs, outputs[ref][label]):
            worst = max(worst, float(np.abs(o - r).max()))
    return worst


def load_seconds(folder: Path, image_size: int, repeats: int) -> float:
    """DICOM → the cache form in memory (``load_study`` + ``InMemoryStudy``), median seconds."""
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.io import load_study

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        InMemoryStudy(load_study(folder), CacheParams(image_size=image_size)).volume  # noqa: B018
        times.append(time.perf_counter() - t0)
    return median(times)


def rows_of(
    name: str,
    eng: Engines,
    backends: tuple[str, ...],
    phases: dict[str, dict[str, float]],
    numpy_s: dict[str, float],
    outputs: dict,
    n1: str,
    detail: dict[int, str],
    threads: int,
    quick: bool,
) -> list[Row]:
    """One row per recipe variant and backend (per-study seconds vs torch fp32), and the goals' rows."""
    cmd, base = command("backends", quick), backends[0]
    rows = []
    for i, what in detail.items():
        member = eng.ref[i]
        variant = f"{name}: {eng.ref[0].backbone} stage 1 + {member.backbone} ({member.kind})"
        total, kept = {}, {}
        for b in backends:
            s1 = numpy_s["stage1"] + sum(t for k, t in phases[b].items() if k.startswith("stage 1"))
            parts = {"load": numpy_s["load"], "stage1": s1, "crops": numpy_s[f"crops [{i}]"]}
            parts["stage2"] = phases[b][f"stage 2 [{i}]"]
            total[b] = sum(parts.values())
            sub = {
                b: {k: v for k, v in outputs[b].items() if k.startswith("stage 1") or k == f"stage 2 [{i}]"}
            }
            sub[base] = {k: v for k, v in outputs[base].items() if k in sub[b]}
            delta = _delta(sub, b, base)
            kept[b] = delta <= (KEPT if "bf16" in b else 1e-4)
            phases_txt = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
            production = name == "production"
            rows.append(
                Row(
                    "backends",
                    f"{variant}, {b}: one study (s)",
                    total[b],
                    "s",
                    "torch eager fp32" if b != base else "",
                    total[base] if b != base else None,
                    goal=f"≤{GOAL_S:g} s per study" if production else "—",
                    met=(total[b] <= GOAL_S) if production else None,
                    command=cmd,
                    lower_is_better=True,
                    note=f"phases (s): {phases_txt}; stage 1 on {n1}, stage 2 on {what}; threads {threads}; "
                    f"max |Δp| vs torch fp32 {delta:.1e} ({'kept' if kept[b] else 'NOT kept'}); "
                    f"model load {eng.load_s[b]:.1f} s (once, not per study)",
                )
            )
        if name != "production":
            continue
        ok = [b for b in backends[1:] if kept[b]]
        best = min(ok, key=total.get) if ok else base
        speedup = total[base] / total[best]
        rows.append(
            Row(
                "backends",
                f"{variant}: fastest backend with outputs kept ({best}), one study (s)",
                total[best],
                "s",
                "torch eager fp32",
                total[base],
                goal=f"≥{GOAL_SPEEDUP:g}× torch eager fp32",
                met=speedup >= GOAL_SPEEDUP,
                command=cmd,
                lower_is_better=True,
                note=f"{speedup:.2f}× torch eager fp32; {total[best] / GOAL_S:.1f}× the {GOAL_S:g} s goal "
                f"(stage 2 {phases[best][f'stage 2 [{i}]']:.1f} s of it)",
            )
        )
    return rows


def threads_rows(folder: Path, ckpts: list[Path], quick: bool) -> list[Row]:
    """predict (demo recipe, torch) with ``num_threads=auto`` (the default), 1 and 2 threads, a CPU-heavy
    process spinning beside it; auto is decided at start-up, with that process already running."""
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.inference import Predictor
    from cervspine.io import load_study

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.0)
        load = os.getloadavg()[0]
        variants = {"auto": "auto", "1 thread": 1, "2 threads": 2}
        predictors = {
            k: Predictor.from_checkpoints(ckpts[0], ckpts[1:], device="cpu", num_threads=v)
            for k, v in variants.items()
        }
        auto = predictors["auto"].runtime.num_threads
        study = InMemoryStudy(load_study(folder), CacheParams(image_size=predictors["auto"].image_size))
        times = interleaved(
            {k: (lambda p=p: p.predict(study)) for k, p in predictors.items()}, 1 if quick else 3
        )
    finally:
        spinner.kill()
        spinner.wait()
    t = {k: median(v) for k, v in times.items()}
    cmd = command("backends", quick)
    note = (
        f"demo recipe (torch fp32) on the {study.num_slices}-slice study, a `python -c 'while True: pass'` "
        f"process beside it; load average {load:.1f} on {os.cpu_count()} CPUs when auto chose {auto} "
        f"thread(s) at start-up (auto = 1 is the 1-thread setting itself: any gap is timing noise); "
        f"2 threads: {t['2 threads']:.2f} s"
    )
    return [
        Row(
            "backends",
            f"threads: predict with the default num_threads=auto ({auto}) beside a busy process (s)",
            t["auto"],
            "s",
            "num_threads=1",
            t["1 thread"],
            goal="never slower than 1 thread",
            met=auto == 1 or t["auto"] <= t["1 thread"] * 1.05,
            command=cmd,
            lower_is_better=True,
            note=note,
        ),
        Row(
            "backends",
            "threads: predict with 2 threads beside a busy process (s)",
            t["2 threads"],
            "s",
            "num_threads=1",
            t["1 thread"],
            goal="—",
            command=cmd,
            lower_is_better=True,
        ),
    ]


def main() -> None:
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.cpu import resolve_threads
    from cervspine.io import load_study

    args = cli(__doc__.splitlines()[0])
    folder = bench_study("explicit", n_slices=N_SLICES)
    made = bundles()
    threads = resolve_threads("auto")
    print(f"    threads: auto = {threads} (load average {os.getloadavg()[0]:.1f})", flush=True)
    rows: list[Row] = []
    source = load_study(folder)
    for name, (bundle, ckpts) in made.items():
        from cervspine.bundle import read_manifest

        size = int(read_manifest(bundle, verify=False)["image_size"])
        study = InMemoryStudy(source, CacheParams(image_size=size))
        study.volume  # noqa: B018  (built once, before any timing)
        load = load_seconds(folder, size, 1 if args.quick else 2)
        got = measure(name, bundle, ckpts, study, threads, args.quick, load)
        rows += got
        print(f"    {name}: done", flush=True)
    rows += threads_rows(bench_study("explicit", size=256, n_slices=120), made["demo"][1], args.quick)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
