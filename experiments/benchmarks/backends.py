"""Backends: per-study seconds of the demo models and of the real-data recipes on this CPU, for torch eager
fp32 (the Predictor as predict runs it today), torch bf16, ONNX Runtime and OpenVINO on a bundle's graphs
(``cervspine.export``: fp32; OpenVINO bf16; int8 on both), each phase apart; a projection of a CPU design
that meets the 10 s goal; and predict's default threads beside a CPU-heavy process.

Recipes (random init: ``model.backbone.pretrained=false``; weights do not change the time), composed from
the train configs as train does: demo = the demo pipeline's vertebrae_column_demo (test_resnet at 64²,
3 mm steps) + fracture_demo (ResNet-18, 64² spine crops); production = the rsna job's vertebrae_column
(EfficientNet-B0 per slice at 192², 2 windows × 3 slices, 2 mm steps, BiGRU) + fracture_seq
(EfficientNetV2-S, 7 vertebrae × 15 crops of 224² since issue 32, 384² before; 5 slices + box mask,
BiGRU) and/or fracture_b5 (EfficientNet-B5 + metadata on 384² spine crops of 5-slice stacks). Study: a
synthetic DICOM series of RSNA size, 512×512×300 slices 1 mm apart, one study (every figure is per
study); stage 1's answer is a fixed C1–C7 over 125 slices (the cervical column's ~125 mm) with the spine
box in the middle, so that every backend gets the same stage-2 work whatever its random weights say.

Phases: load (DICOM → the cache form in memory), stage 1 (its inputs + the model), crops (stage-2 inputs),
stage 2 (the model). The numpy phases are the same code for every backend and run once on the whole study.
Stage 1's model runs on the whole study on each backend (every position, then the reader on that backend's
own features). Stage 2 is sampled (at 384² a whole study takes minutes per backend here): the median of one
call on a batch of the recipe's real inputs (8 spine crops; one vertebra's 15-crop sequence), times the
study's number of such batches — said in each row. Backends are interleaved (A B C …, then reversed).

int8: static QDQ quantisation (ONNX Runtime's quantize_static, per-channel weights) calibrated on this
study's own inputs, of the stage-1 encoder and the stage-2 graphs (the GRU reader stays fp32); a bench-only
variant (not yet a bundle precision: calibration belongs on real crops of the trained model). A reduced
precision counts only where its probabilities stay within 1e-2 of torch fp32 ("kept"); fp32 backends must
stay within 1e-4.

    python -m experiments.benchmarks.backends [--quick] [--threads N|auto] [--table PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmarks.common import (
    BENCH_DATA,
    Row,
    _building,
    _stamp,
    bench_study,
    command,
    config_key,
    finish,
    hydra_config,
    interleaved,
    median,
)

GOAL_SPEEDUP, GOAL_S, KEPT, EQUAL = 1.5, 10.0, 1e-2, 1e-4
RECIPES = {
    "demo": ("vertebrae_column_demo", "fracture_demo"),
    "production": ("vertebrae_column", "fracture_seq", "fracture_b5"),
}
BACKENDS = (
    "torch fp32",
    "torch bf16",
    "onnxruntime fp32",
    "onnxruntime int8",
    "openvino fp32",
    "openvino bf16",
    "openvino int8",
)
QUICK_BACKENDS = ("torch fp32", "torch bf16", "onnxruntime fp32")
BASE = BACKENDS[0]
N_SLICES, SPACING_MM, SPINE_MM, SPINE_FROM = 300, 1.0, 125.0, 40  # the study; where stage 1 puts C1–C7
CHECKPOINTS = 2  # the version of recipe_checkpoint's making (a new one: the bundles are made again)
BATCH = 64  # stage-1 positions per call (the predictors' default batch size)
TABLE = Path(__file__).with_name("BACKENDS.md")
# the CPU design the projection prices: stage 1 at 3 mm steps, the sequence member alone, 8 crops of 256²
CPU_DESIGN = {"z_step_mm": 3.0, "input_size": 256, "n_slices": 8}
Feeds = dict[str, np.ndarray]
Fn = Callable[[Feeds], list[np.ndarray]]


# ------------------------------------------------------------------------------------------ the models


def recipe_checkpoint(experiment: str, folder: Path, role: str, source: Any) -> Path:
    """A random-init checkpoint of a train recipe (its model and data settings, composed as train does),
    with the BatchNorm statistics of its own inputs cut from the bench study ``source`` (a loaded DICOM
    study), as a trained network has those of its data. Without, BatchNorm is the identity at init and on
    CT crops EfficientNet's logits reach ~1e4: fp32 rounding alone then moves torch's own probabilities
    from 0 to 1 (fp32 vs fp64), and no comparison of backends means anything."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cervspine.bundle.export import save_checkpoint
    from cervspine.inference import Runtime, load_stage1, load_stage2

    overrides = [f"experiment={experiment}", "model.backbone.pretrained=false", "print_config=false"]
    with hydra_config("train", overrides, folder / "logs") as cfg:
        data_hp = OmegaConf.to_container(cfg.data, resolve=True)
        for key in ("_target_", "augment"):
            data_hp.pop(key, None)
        module = instantiate(cfg.model)
    path = save_checkpoint(module.eval(), data_hp, folder / f"{experiment}.ckpt")
    stage = (load_stage1 if role == "stage1" else load_stage2)(path, Runtime.create("cpu"))
    from cervspine.cache import CacheParams, InMemoryStudy

    study = InMemoryStudy(source, CacheParams(image_size=int(data_hp["image_size"])))
    batches = list(study_batches(stage, role, study))
    norms = [m for m in stage.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    stage.model.train()
    with torch.no_grad():
        for module, feeds in batches:
            module(*(torch.from_numpy(v) for v in feeds.values()))
    for m in norms:
        m.momentum = 0.1
    return save_checkpoint(stage.model.eval(), data_hp, path)


def study_batches(stage: Any, role: str, study: Any) -> Any:
    """(graph module, feeds) of a few batches of ``stage``'s real inputs on ``study`` (the same input code
    as inference; stage 2 with :func:`stage1_answer`)."""
    from cervspine.bundle import graphs as g
    from cervspine.data.column_sampler import spacing_mm
    from cervspine.data.slice_inputs import slice_batch, slice_inputs
    from cervspine.data.vertebra_crops import study_sequences
    from cervspine.data.windows import stack_slices, windowed_volume

    dz, model = spacing_mm(study), stage.model
    if role == "stage1" and stage.kind == "column":
        idx = stage.sampler.positions(study.num_slices, dz)
        for chunk in np.array_split(idx, 4)[:3]:
            yield g.ColumnEncoderGraph(model), {"slices": stage.sampler.inputs(study.volume, chunk[:16], dz)}
    elif role == "stage1":
        win = windowed_volume(study.volume, stage.stack)
        for chunk in np.array_split(np.arange(study.num_slices), 4)[:3]:
            yield g.SliceDetectorGraph(model), {"image": stack_slices(win, chunk[:16], stage.stack.offsets)}
    elif stage.kind == "slice":
        answer = stage1_answer(study.num_slices, dz)
        inputs = slice_inputs(study, answer, stage.spec, stage.stack)
        for chunk in np.array_split(inputs.slices, 3):
            imgs, metas, _ = slice_batch(inputs, chunk[:8], stage.stack)
            yield g.SliceClassifierGraph(model), {"image": imgs, "meta": metas}
    else:
        c, answer = stage.cropper, stage1_answer(study.num_slices, dz)
        extents = c.extents_from_stage1(answer.visibility, answer.boxes)
        images, _, _ = study_sequences(c, study.volume, extents, answer.visibility, answer.boxes)
        for v in (0, 3, 6):
            feeds = {"image": images[None, v : v + 1], "present": np.ones((1, 1), np.float32)}
            yield g.SequenceGraph(model), feeds


def bundles(source: Any) -> dict[str, tuple[Path, list[Path]]]:
    """recipe → (bundle, [stage-1, stage-2 … checkpoints]), made once per version of the configs, of the
    graphs' code, of the manifest and of the study (``source``: its BatchNorm statistics)."""
    from cervspine.bundle import VERSION as BUNDLE_VERSION
    from cervspine.bundle import graphs as bundle_graphs

    out = {}
    code = [Path(bundle_graphs.__file__), Path(bundle_graphs.__file__).with_name("export.py")]
    for name, experiments in RECIPES.items():
        files = [f"experiment/{e}.yaml" for e in experiments]
        files += [f"{kind}/{m}.yaml" for kind in ("model", "data") for m in ("vertebrae_column", "fracture")]
        files += ["model/fracture_seq.yaml", "data/fracture_seq.yaml"]
        key = config_key(*files, *code)
        tag = f"{N_SLICES}x{SPACING_MM:g}mm_c{CHECKPOINTS}"
        path = BENCH_DATA / f"bundle_{name}_v{BUNDLE_VERSION}_{tag}_{key}"
        if not _stamp(path).is_file():
            from cervspine.bundle.export import export_bundle

            t0 = time.perf_counter()
            with _building(path) as tmp:
                roles = ["stage1"] + ["stage2"] * (len(experiments) - 1)
                ckpts = [recipe_checkpoint(e, tmp / "ckpts", r, source) for e, r in zip(experiments, roles)]
                export_bundle(tmp / "bundle", ckpts[0], ckpts[1:])
            print(f"    exported the {name} bundle in {time.perf_counter() - t0:.0f} s", flush=True)
        out[name] = (path / "bundle", [path / "ckpts" / f"{e}.ckpt" for e in experiments])
    return out


def one_sequence_graph(model: Any, cropper: Any, path: Path) -> Path:
    """The sequence model's graph for one vertebra's sequence (the bundle's holds all 7: one call of it
    would take a minute here); its time × the vertebrae present is the study's."""
    if path.is_file():
        return path
    import torch

    from cervspine.bundle.graphs import GraphSpec, SequenceGraph, export_graph, plain

    c = cropper
    x = torch.rand(1, 1, 2, c.channels, c.input_size, c.input_size)  # the slice axis is dynamic
    inputs, dyn = {"image": x, "present": torch.ones(1, 1)}, {"image": {0: "batch", 2: "slices"}}
    tmp = path.with_name(f".tmp-{path.name}")
    export_graph(GraphSpec(SequenceGraph(plain(model)), inputs, ["vertebra"], dyn), tmp)
    tmp.rename(path)
    return path


def int8_graph(src: Path, dst: Path, batches: list[Feeds]) -> Path:
    """``src`` quantised to int8 (QDQ, per-channel weights, uint8 activations) calibrated on ``batches``;
    made once (cached at ``dst``)."""
    if dst.is_file():
        return dst
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = list(batches)

        def get_next(self) -> Feeds | None:
            return self.left.pop(0) if self.left else None

    t0 = time.perf_counter()
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
            pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            names = {i.name for i in _onnx_inputs(pre)}
            reader = Reader()
            reader.left = [{k: v for k, v in b.items() if k in names} for b in batches]
            quantize_static(
                str(pre),
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            out.rename(dst)
    finally:
        logging.disable(level)
    print(f"    quantised {src.name} to int8 in {time.perf_counter() - t0:.0f} s", flush=True)
    return dst


def _onnx_inputs(path: Path) -> list[Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


# ------------------------------------------------------------------------------------------ the study


def stage1_answer(n: int, dz: float) -> Any:
    """C1–C7 over the SPINE_MM from slice SPINE_FROM (7 contiguous ranges), the spine box in the middle."""
    from cervspine.data.stage1_table import Stage1Output

    vis = np.zeros((n, 7), np.float32)
    lo = SPINE_FROM
    hi = min(n, lo + int(round(SPINE_MM / dz)))
    for v, part in enumerate(np.array_split(np.arange(lo, hi), 7)):
        vis[part, v] = 0.9
    boxes = np.tile(np.float32([0.35, 0.35, 0.65, 0.65]), (n, 1))
    return Stage1Output(vis, boxes).masked()


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


@dataclasses.dataclass
class Work:
    """One recipe's inputs on the study (numpy, made once) and what each model call is fed."""

    numpy_s: dict[str, float]  # load, stage1 (its inputs), crops [i]
    stage1: dict[str, Any]  # kind, inputs (all positions/slices), reader extras
    calls: dict[str, tuple[Feeds, float, str]]  # stage 2 [i] → (a batch, batches per study, what)
    calibration: dict[str, list[Feeds]]  # graph role → int8 calibration batches (not the timed ones)
    n1: str  # what stage 1 ran on


def prepare(study: Any, ref: Any, load_s: float) -> Work:
    """The numpy phases, timed once on the whole study, with the bundle's input settings ``ref`` (a
    BundlePredictor: the same input code as the torch strategies)."""
    from cervspine.data.column_sampler import spacing_mm
    from cervspine.data.slice_inputs import slice_batch, slice_inputs
    from cervspine.data.vertebra_crops import study_sequences
    from cervspine.data.windows import stack_slices, windowed_volume

    s1, numpy_s = ref.stage1, {"load": load_s}
    dz = spacing_mm(study)
    t0 = time.perf_counter()
    if s1.kind == "column":
        idx = s1.sampler.positions(study.num_slices, dz)
        x = s1.sampler.inputs(study.volume, idx, dz)
        step = np.float32([s1.sampler.stride(dz) * dz])
        stage1 = {"kind": "column", "x": x, "step": step}
        n1 = f"{len(idx)} positions {s1.sampler.stride(dz) * dz:g} mm apart at {s1.sampler.input_size}²"
    else:
        win = windowed_volume(study.volume, s1.stack)
        x = stack_slices(win, np.arange(study.num_slices), s1.stack.offsets)
        stage1 = {"kind": "slice", "x": x}
        n1 = f"{study.num_slices} slices at {s1.stack.input_size}²"
    numpy_s["stage1"] = time.perf_counter() - t0
    calibration = {"stage1": [{"slices": x[-16:], "image": x[-16:]}]}
    answer = stage1_answer(study.num_slices, dz)
    calls = {}
    for i, member in enumerate(ref.stage2, start=1):
        t0 = time.perf_counter()
        if member.kind == "slice":
            inputs = slice_inputs(study, answer, member.spec, member.stack)
            imgs, metas, _ = slice_batch(inputs, inputs.slices, member.stack)
            numpy_s[f"crops [{i}]"] = time.perf_counter() - t0
            b = 8 if member.stack.input_size > 128 else 32
            n = len(inputs.slices)
            calls[f"stage 2 [{i}]"] = (
                {"image": imgs[:b], "meta": metas[:b]},
                n / b,
                f"{n} slices at {member.stack.input_size}² (a batch of {b} timed, × {n / b:.1f})",
            )
            calibration[f"stage 2 [{i}]"] = [{"image": imgs[-b:], "meta": metas[-b:]}]
        else:
            c = member.cropper
            extents = c.extents_from_stage1(answer.visibility, answer.boxes)
            images, _, present = study_sequences(c, study.volume, extents, answer.visibility, answer.boxes)
            numpy_s[f"crops [{i}]"] = time.perf_counter() - t0
            k = int(present.sum())
            one = {"image": images[None, :1], "present": np.ones((1, 1), np.float32)}
            calls[f"stage 2 [{i}]"] = (
                one,
                float(k),
                f"{k} vertebrae × {c.n_slices} crops at {c.input_size}² (one vertebra timed, × {k})",
            )
            calibration[f"stage 2 [{i}]"] = [{"image": images[None, -1:], "present": one["present"]}]
    return Work(numpy_s, stage1, calls, calibration, n1)


# ------------------------------------------------------------------------------------------ the backends


class Engine:
    """One backend's forward passes (numpy in, numpy out) by role: "stage1" (the per-slice detector or
    the column encoder), "reader" (the column reader), "stage 2 [i]"; and its model-load seconds."""

    def __init__(self, backend: str, bundle: Path, ckpts: list[Path], threads: int, extra: dict[str, Path]):
        self.backend, self.fns = backend, {}
        t0 = time.perf_counter()
        if backend.startswith("torch"):
            self._torch(backend.split()[1], ckpts, threads, bundle)
        else:
            self._onnx(backend, bundle, threads, extra)
        self.load_s = time.perf_counter() - t0

    def _torch(self, precision: str, ckpts: list[Path], threads: int, bundle: Path) -> None:
        import torch

        from cervspine.bundle import graphs as g
        from cervspine.inference import Runtime, load_stage1, load_stage2

        rt = Runtime.create("cpu", precision=precision, num_threads=threads)
        s1 = load_stage1(ckpts[0], rt)
        members = [load_stage2(c, rt) for c in ckpts[1:]]

        def fn(module: torch.nn.Module) -> Fn:
            def run(feeds: Feeds) -> list[np.ndarray]:
                with rt.threads(), torch.inference_mode(), rt.autocast():
                    out = module(*(torch.from_numpy(v) for v in feeds.values()))
                out = [out] if isinstance(out, torch.Tensor) else out
                return [o.float().numpy() for o in out]

            return run

        if s1.kind == "column":
            self.fns["stage1"] = fn(g.ColumnEncoderGraph(s1.model))
            self.fns["reader"] = fn(g.ColumnReaderGraph(s1.model))
        else:
            self.fns["stage1"] = fn(g.SliceDetectorGraph(s1.model))
        for i, m in enumerate(members, start=1):
            wrap = g.SliceClassifierGraph if m.kind == "slice" else g.SequenceGraph
            self.fns[f"stage 2 [{i}]"] = fn(wrap(m.model))
        self.modules = [s1, *members]  # the sequence graph of one vertebra is exported from these

    def _onnx(self, backend: str, bundle: Path, threads: int, extra: dict[str, Path]) -> None:
        """The bundle's graphs; ``extra``: "one [i]" (one vertebra's sequence graph of member i) and the
        int8 graphs by role (used by the int8 backends)."""
        from cervspine.bundle import read_manifest
        from cervspine.bundle.backends import open_graph

        runtime, precision = backend.split()
        m = read_manifest(bundle, verify=False)
        files = {role: bundle / g["file"] for role, g in m["stage1"]["graphs"].items()}
        roles = {"stage1": files.get("encoder", files.get("model")), "reader": files.get("reader")}
        for i, rec in enumerate(m["stage2"], start=1):
            roles[f"stage 2 [{i}]"] = extra.get(f"one [{i}]") or bundle / rec["graphs"]["model"]["file"]
        if precision == "int8":
            roles.update({r: extra[r] for r in list(roles) if r in extra})
        for role, path in roles.items():
            if path is None:
                continue
            p = "bf16" if precision == "bf16" else "fp32"  # int8: the QDQ graph, the rest in fp32
            graph = open_graph(path, runtime, p, threads)
            self.fns[role] = lambda feeds, graph=graph: [np.asarray(o, np.float32) for o in graph(feeds)]


def stage1_run(engine: Engine, work: Work, warm: bool = False) -> Callable[[], list[np.ndarray]]:
    """Stage 1's model on the whole study: every position in batches (+ the reader on its features).
    ``warm``: a cheap warm-up of the same shapes instead (the first batch, the last part, the reader)."""
    s = work.stage1
    key = "slices" if s["kind"] == "column" else "image"

    def run() -> list[np.ndarray]:
        x = s["x"]
        starts = range(0, len(x), BATCH)
        if warm:
            starts = sorted({0, starts[-1]})
        outs = [engine.fns["stage1"]({key: x[a : a + BATCH]}) for a in starts]
        if s["kind"] != "column":
            return [np.concatenate([o[k] for o in outs]) for k in range(2)]
        feats = np.concatenate([o[0] for o in outs])[None].astype(np.float32)
        if warm:
            feats = np.zeros((1, len(x), feats.shape[-1]), np.float32)
        feeds = {"features": feats, "lengths": np.int64([feats.shape[1]]), "step_mm": s["step"]}
        return engine.fns["reader"](feeds)

    return run


def small(feeds: Feeds) -> Feeds:
    """A warm-up version of a stage-2 batch: one crop (a sequence: two), the same image size."""
    if feeds["image"].ndim == 6:
        return {**feeds, "image": feeds["image"][:, :, :2]}
    return {k: v[:1] for k, v in feeds.items()}


def _delta(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


def _kept(backend: str, delta: float) -> bool:
    return delta <= (EQUAL if backend.endswith("fp32") else KEPT)


@dataclasses.dataclass
class Measured:
    """One recipe's figures: numpy phases, model phases per backend, max |Δ| vs torch fp32."""

    name: str
    work: Work
    backbones: list[str]
    kinds: list[str]
    model_s: dict[str, dict[str, float]]  # backend → role → per-study seconds
    delta: dict[str, dict[str, float]]  # backend → role → max |Δ|
    load_s: dict[str, float]
    end_to_end: dict[str, tuple[float, int]] = dataclasses.field(default_factory=dict)

    def phases(self, backend: str, members: list[int]) -> dict[str, float]:
        w, m = self.work.numpy_s, self.model_s[backend]
        return {
            "load": w["load"],
            "stage1": w["stage1"] + m["stage1"],
            "crops": sum(w[f"crops [{i}]"] for i in members),
            "stage2": sum(m[f"stage 2 [{i}]"] for i in members),
        }

    def total(self, backend: str, members: list[int]) -> float:
        return sum(self.phases(backend, members).values())

    def composite(self, pick: dict[str, str], members: list[int]) -> float:
        """Per-study seconds with each model call on the backend ``pick`` names for it."""
        w = self.work.numpy_s
        numpy_s = w["load"] + w["stage1"] + sum(w[f"crops [{i}]"] for i in members)
        return numpy_s + sum(self.model_s[b][r] for r, b in pick.items())

    def worst(self, backend: str, members: list[int]) -> float:
        d = self.delta[backend]
        return max([d["stage1"], *(d[f"stage 2 [{i}]"] for i in members)])


def measure(
    name: str,
    bundle: Path,
    ckpts: list[Path],
    folder: Path,
    threads: int,
    backends: tuple[str, ...],
    quick: bool,
) -> Measured:
    from cervspine.bundle import BundlePredictor
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.io import load_study

    ref = BundlePredictor(bundle, num_threads=threads, verify=False)  # the input settings (no timing)
    study = InMemoryStudy(load_study(folder), CacheParams(image_size=ref.image_size))
    study.volume  # noqa: B018  (built once, before any timing)
    work = prepare(study, ref, load_seconds(folder, ref.image_size, 1 if quick else 2))
    print(
        f"    {name}: numpy phases " + ", ".join(f"{k} {v:.2f} s" for k, v in work.numpy_s.items()),
        flush=True,
    )
    engines = {b: Engine(b, bundle, ckpts, threads, {}) for b in backends[:1]}  # torch fp32: the reference
    extra = graphs_for(bundle, engines[BASE], ref, work, any("int8" in b for b in backends))
    for b in backends[1:]:
        engines[b] = Engine(b, bundle, ckpts, threads, extra)
    print(
        f"    {name}: model load " + ", ".join(f"{b} {e.load_s:.1f} s" for b, e in engines.items()),
        flush=True,
    )

    model_s: dict[str, dict[str, float]] = {b: {} for b in backends}
    outs: dict[str, dict[str, list[np.ndarray]]] = {b: {} for b in backends}

    # every call timed after a cheap warm-up of its shapes on each backend (the first run of a shape
    # allocates, and OpenVINO compiles kernels for it)
    def keep(b: str, role: str, run: Callable[[], list[np.ndarray]]) -> Callable[[], None]:
        def go() -> None:
            outs[b][role] = run()

        return go

    for e in engines.values():
        stage1_run(e, work, warm=True)()
    times = interleaved({b: keep(b, "stage1", stage1_run(e, work)) for b, e in engines.items()}, 1, warmup=0)
    for b in backends:
        model_s[b]["stage1"] = median(times[b])
    print(
        f"    {name} stage 1: " + ", ".join(f"{b} {model_s[b]['stage1']:.2f} s" for b in backends), flush=True
    )
    for role, (feeds, per_study, _) in work.calls.items():
        runs = {
            b: keep(b, role, lambda e=e, role=role, feeds=feeds: e.fns[role](feeds))
            for b, e in engines.items()
        }
        for e in engines.values():
            e.fns[role](small(feeds))
        times = interleaved(runs, 1 if quick else 2, warmup=0)
        for b in backends:
            model_s[b][role] = median(times[b]) * per_study
        print(
            f"    {name} {role}: " + ", ".join(f"{b} {model_s[b][role]:.2f} s" for b in backends), flush=True
        )
    delta = {b: {r: _delta(o, outs[BASE][r]) for r, o in outs[b].items()} for b in backends}
    for b in backends[1:]:
        print(
            f"    {name} max |Δ| {b}: " + ", ".join(f"{r} {d:.1e}" for r, d in delta[b].items()), flush=True
        )
    kinds = [ref.stage1.kind, *(m.kind for m in ref.stage2)]
    backbones = [ref.stage1.backbone, *(m.backbone for m in ref.stage2)]
    got = Measured(name, work, backbones, kinds, model_s, delta, {b: e.load_s for b, e in engines.items()})
    del engines
    if name == "demo":
        got.end_to_end = end_to_end(bundle, ckpts, study, threads, backends)
    return got


def graphs_for(bundle: Path, torch_engine: Engine, ref: Any, work: Work, int8: bool) -> dict[str, Path]:
    """The extra graphs the bench times: one vertebra's sequence graph per sequence member ("one [i]"), and
    with ``int8`` the int8 graphs of stage 1 (encoder / slice detector) and of each stage-2 call."""
    extra, folder = {}, bundle.parent
    for i, member in enumerate(ref.stage2, start=1):
        if member.kind == "sequence":
            model = torch_engine.modules[i].model
            extra[f"one [{i}]"] = one_sequence_graph(model, member.cropper, folder / f"sequence_{i}_one.onnx")
    if not int8:
        return extra
    m = ref.manifest
    s1 = m["stage1"]["graphs"]
    src = bundle / (s1.get("encoder") or s1["model"])["file"]
    out = {"stage1": int8_graph(src, folder / f"int8_{src.name}", work.calibration["stage1"]), **extra}
    for i, rec in enumerate(m["stage2"], start=1):
        role = f"stage 2 [{i}]"
        src = extra.get(f"one [{i}]") or bundle / rec["graphs"]["model"]["file"]
        out[role] = int8_graph(src, folder / f"int8_{src.name}", work.calibration[role])
    return out


def end_to_end(bundle: Path, ckpts: list[Path], study: Any, threads: int, backends: tuple[str, ...]) -> dict:
    """(seconds, slices stage 2 scored) of one whole ``predict(study)`` per backend (torch: the Predictor;
    the others: the BundlePredictor; int8 is not a bundle precision): the check of the phase sums (demo
    recipe only; its random stage 1 decides how many slices stage 2 scores, not :func:`stage1_answer`)."""
    from cervspine.bundle import BundlePredictor
    from cervspine.inference import Predictor

    predictors = {}
    for b in backends:
        name, precision = b.split()
        if precision == "int8":
            continue
        if name == "torch":
            predictors[b] = Predictor.from_checkpoints(
                ckpts[0], ckpts[1:], device="cpu", precision=precision, num_threads=threads
            )
        else:
            predictors[b] = BundlePredictor(bundle, backend=name, precision=precision, num_threads=threads)
    scored = {}

    def run(b: str, p: Any) -> Callable[[], None]:
        def go() -> None:
            scored[b] = len(p.predict(study).fracture_slices)

        return go

    times = interleaved({b: run(b, p) for b, p in predictors.items()}, 1, warmup=1)
    return {b: (median(t), scored[b]) for b, t in times.items()}


# ------------------------------------------------------------------------------------------ rows


def rows_of(m: Measured, backends: tuple[str, ...], threads: int, quick: bool) -> list[Row]:
    """Per recipe variant (stage 1 + one stage-2 member; production also the rsna job's ensemble) and
    backend: per-study seconds vs torch fp32 in the same run; production: the fastest kept backend."""
    cmd, production = command("backends", quick), m.name == "production"
    members = list(range(1, len(m.kinds)))
    variants = [[i] for i in members] + ([members] if production and len(members) > 1 else [])
    rows = []
    for chosen in variants:
        s2 = " + ".join(f"{m.backbones[i]} ({m.kinds[i]})" for i in chosen)
        label = f"{m.name}: {m.backbones[0]} ({m.kinds[0]}) + {s2}"
        if len(chosen) > 1:
            label += " — the rsna job's ensemble"
        what = "; ".join(m.work.calls[f"stage 2 [{i}]"][2] for i in chosen)
        ensemble = len(chosen) > 1
        for b in backends:
            if ensemble and b not in (BASE, fastest(m, backends, chosen)):
                continue  # the ensemble: the baseline and the fastest only (its parts are the rows above)
            total, delta = m.total(b, chosen), m.worst(b, chosen)
            phases = ", ".join(f"{k} {v:.2f}" for k, v in m.phases(b, chosen).items())
            e2e = m.end_to_end.get(b) if len(chosen) == len(members) else None
            note = (
                f"phases (s): {phases}; stage 1 on {m.work.n1} (whole study), stage 2 on {what}; threads "
                f"{threads}; max |Δ| vs torch fp32 {delta:.1e} "
                f"({'kept' if _kept(b, delta) else 'NOT kept'}); "
                f"model load {m.load_s[b]:.1f} s (once per process, not per study)"
                + (
                    f"; one whole predict(study) measured: {e2e[0]:.2f} s, without load, its random stage 1 "
                    f"sending {e2e[1]} slices to stage 2"
                    if e2e is not None
                    else ""
                )
            )
            rows.append(
                Row(
                    "backends",
                    f"{label}, {b}: one study (s)",
                    total,
                    "s",
                    "torch eager fp32" if b != BASE else "",
                    m.total(BASE, chosen) if b != BASE else None,
                    goal=f"≤{GOAL_S:g} s per study" if production else "—",
                    met=(total <= GOAL_S) if production else None,
                    command=cmd,
                    lower_is_better=True,
                    note=note,
                )
            )
        if not production:
            continue
        best = fastest(m, backends, chosen)
        speedup = m.total(BASE, chosen) / m.total(best, chosen)
        pick = per_phase(m, backends, chosen)
        mixed = ", ".join(f"{r} {b}" for r, b in pick.items())
        rows.append(
            Row(
                "backends",
                f"{label}: the fastest backend with outputs kept ({best}) vs torch eager fp32 (s)",
                m.total(best, chosen),
                "s",
                "torch eager fp32",
                m.total(BASE, chosen),
                goal=f"≥{GOAL_SPEEDUP:g}× torch eager fp32",
                met=speedup >= GOAL_SPEEDUP,
                command=cmd,
                lower_is_better=True,
                note=f"{speedup:.2f}× torch eager fp32; "
                f"{m.total(best, chosen) / GOAL_S:.1f}× the {GOAL_S:g} s "
                f"goal (stage 2 {m.phases(best, chosen)['stage2']:.1f} s of it, on {threads} thread(s)); "
                f"each model call on its fastest kept backend ({mixed}; not one BundlePredictor, which runs "
                f"one backend, and int8 is not a bundle precision): {m.composite(pick, chosen):.1f} s, "
                f"{m.total(BASE, chosen) / m.composite(pick, chosen):.2f}× torch eager fp32",
            )
        )
    return rows


def fastest(m: Measured, backends: tuple[str, ...], chosen: list[int]) -> str:
    ok = [b for b in backends[1:] if _kept(b, m.worst(b, chosen))]
    return min(ok, key=lambda b: m.total(b, chosen)) if ok else BASE


def design_rows(
    m: Measured, folder: Path, bundle: Path, ckpts: list[Path], threads: int, quick: bool
) -> list[Row]:
    """What a CPU design meeting the 10 s goal costs: stage 1 at CPU_DESIGN's steps, the sequence member
    alone on fewer, smaller crops — its numpy phases measured, its model phases projected from the fastest
    kept backend's measured seconds × the ratio of the design's to the recipe's seconds measured on torch
    bf16 (same weights, smaller inputs; convolutions cost in proportion to pixels × crops)."""
    import torch

    from cervspine.bundle import BundlePredictor
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.data.column_sampler import spacing_mm
    from cervspine.data.vertebra_crops import study_sequences
    from cervspine.inference import Runtime, load_stage2
    from cervspine.io import load_study

    seq = next((i for i, k in enumerate(m.kinds) if i and k == "sequence"), None)
    if seq is None or quick:
        return []
    ref = BundlePredictor(bundle, num_threads=threads, verify=False)
    study = InMemoryStudy(load_study(folder), CacheParams(image_size=ref.image_size))
    study.volume  # noqa: B018
    dz = spacing_mm(study)
    sampler = dataclasses.replace(ref.stage1.sampler, z_step_mm=CPU_DESIGN["z_step_mm"])
    t0 = time.perf_counter()
    idx = sampler.positions(study.num_slices, dz)
    sampler.inputs(study.volume, idx, dz)
    s1_numpy = time.perf_counter() - t0
    full_positions = len(ref.stage1.sampler.positions(study.num_slices, dz))
    member = ref.stage2[seq - 1]
    cropper = dataclasses.replace(
        member.cropper, input_size=CPU_DESIGN["input_size"], n_slices=CPU_DESIGN["n_slices"]
    )
    answer = stage1_answer(study.num_slices, dz)
    t0 = time.perf_counter()
    extents = cropper.extents_from_stage1(answer.visibility, answer.boxes)
    images, _, present = study_sequences(cropper, study.volume, extents, answer.visibility, answer.boxes)
    crops = time.perf_counter() - t0
    k = int(present.sum())
    rt = Runtime.create("cpu", precision="bf16", num_threads=threads)
    from cervspine.bundle.graphs import SequenceGraph

    graph = SequenceGraph(load_stage2(ckpts[seq], rt).model)
    recipe_feeds = m.work.calls[f"stage 2 [{seq}]"][0]
    design_feeds = {"image": images[None, :1], "present": np.ones((1, 1), np.float32)}

    def call(feeds: Feeds) -> Callable[[], None]:
        def run() -> None:
            with rt.threads(), torch.inference_mode(), rt.autocast():
                graph(*(torch.from_numpy(v) for v in feeds.values()))

        return run

    times = interleaved({"recipe": call(recipe_feeds), "design": call(design_feeds)}, 2, warmup=1)
    ratio = median(times["design"]) / median(times["recipe"])
    role = f"stage 2 [{seq}]"
    pick = per_phase(m, tuple(m.model_s), [seq])
    s1_model = m.model_s[pick["stage1"]]["stage1"] * len(idx) / full_positions
    s2 = m.model_s[pick[role]][role] * ratio
    parts = {"load": m.work.numpy_s["load"], "stage1": s1_numpy + s1_model, "crops": crops, "stage2": s2}
    total = sum(parts.values())
    d = CPU_DESIGN
    where = f"stage 1 on {pick['stage1']}, stage 2 on {pick[role]}"
    return [
        Row(
            "backends",
            f"design change (projected): stage 1 at {d['z_step_mm']:g} mm steps + {m.backbones[seq]} "
            f"(sequence) alone on {k} × {d['n_slices']} crops at {d['input_size']}², {where}: one study (s)",
            total,
            "s",
            "the recipe on the same backends",
            m.composite(pick, [seq]),
            goal=f"≤{GOAL_S:g} s per study",
            met=total <= GOAL_S,
            command=command("backends", quick),
            lower_is_better=True,
            note=f"phases (s): {', '.join(f'{a} {v:.2f}' for a, v in parts.items())}; numpy phases measured; "
            f"stage 1's model = {pick['stage1']}'s measured {m.model_s[pick['stage1']]['stage1']:.2f} s × "
            f"{len(idx)}/{full_positions} positions; stage 2 = {pick[role]}'s measured "
            f"{m.model_s[pick[role]][role]:.2f} s × {ratio:.3f} (the design's / the recipe's one-vertebra "
            f"call on torch bf16, same random weights); each the fastest backend with its outputs kept "
            f"there; threads {threads}. A projection: what the smaller inputs cost in accuracy is not known "
            "without training on the real data",
        )
    ]


def per_phase(m: Measured, backends: tuple[str, ...], chosen: list[int]) -> dict[str, str]:
    """role → the fastest backend whose outputs on that model call are kept (stage 1, each stage 2)."""
    roles = ["stage1", *(f"stage 2 [{i}]" for i in chosen)]
    return {
        r: min((b for b in backends if _kept(b, m.delta[b][r])), key=lambda b: m.model_s[b][r]) for r in roles
    }


# ------------------------------------------------------------------------------------------ threads


@contextlib.contextmanager
def busy_process():
    """A CPU-heavy process beside this one (a Python busy loop), running for 2 s before the body."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(2.0)
        yield os.getloadavg()[0]
    finally:
        spinner.kill()
        spinner.wait()


def threads_rows(folder: Path, bundle: Path, ckpts: list[Path], quick: bool) -> list[Row]:
    """predict (demo recipe) with ``num_threads=auto`` (the default), 1 and 2 threads, a CPU-heavy process
    beside it — on torch (the Predictor) and on ONNX Runtime (the bundle); auto is decided at start-up,
    with that process already running."""
    from cervspine.bundle import BundlePredictor
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.inference import Predictor
    from cervspine.io import load_study

    source = load_study(folder)
    variants = {"auto": "auto", "1 thread": 1, "2 threads": 2}
    rows, cmd = [], command("backends", quick)
    makers = {
        "torch": lambda v: Predictor.from_checkpoints(ckpts[0], ckpts[1:], device="cpu", num_threads=v),
        "onnxruntime": lambda v: BundlePredictor(bundle, backend="onnxruntime", num_threads=v),
    }
    for runtime, make in makers.items():
        with busy_process() as load:
            predictors = {k: make(v) for k, v in variants.items()}
            first = predictors["auto"]
            auto = first.runtime.num_threads if runtime == "torch" else first.num_threads
            study = InMemoryStudy(source, CacheParams(image_size=first.image_size))
            study.volume  # noqa: B018
            times = interleaved(
                {k: (lambda p=p, s=study: p.predict(s)) for k, p in predictors.items()}, 1 if quick else 3
            )
        t = {k: median(v) for k, v in times.items()}
        note = (
            f"demo recipe ({runtime}, fp32) on a {study.num_slices}-slice study, a `python -c 'while True: "
            f"pass'` process beside it; load average {load:.1f} on {os.cpu_count()} CPUs when auto chose "
            f"{auto} thread(s) at start-up"
            + (" (the 1-thread setting itself: a gap is timing noise)" if auto == 1 else "")
            + f"; 2 threads: {t['2 threads']:.2f} s "
            f"({t['1 thread'] / t['2 threads']:.2f}× the 1-thread speed)"
        )
        rows.append(
            Row(
                "backends",
                f"threads: predict ({runtime}) with the default num_threads=auto ({auto}) "
                "beside a busy process (s)",
                t["auto"],
                "s",
                "num_threads=1",
                t["1 thread"],
                goal="never slower than 1 thread",
                met=auto == 1 or t["auto"] <= t["1 thread"] * 1.05,
                command=cmd,
                lower_is_better=True,
                note=note,
            )
        )
    return rows


# ------------------------------------------------------------------------------------------ table


def table(
    measured: list[Measured], backends: tuple[str, ...], threads: int, quick: bool, elapsed: float
) -> str:
    """The per-phase table (markdown): per recipe variant and backend, seconds per study, × torch fp32."""
    from experiments.benchmarks.common import machine_info

    info = machine_info()
    out = [
        "# Backends: seconds per study, each phase apart",
        "",
        f"`python -m experiments.benchmarks.backends{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({elapsed / 60:.1f} min); "
        f"{info['cpu_model']}, "
        f"{info['nproc']} cores shared with other jobs (load average at the end "
        f"{', '.join(map(str, info['load_average']))}), {threads} thread(s) (num_threads=auto at start-up). "
        "One synthetic study of RSNA size (512×512×300, 1 mm); random-init weights; stage 2 sampled and "
        "extrapolated as each row says (experiments/benchmarks/backends.py). Absolute seconds move with the "
        "box's load: compare the × column (torch eager fp32 in the same run).",
        "",
        "| recipe | backend | load | stage 1 | crops | stage 2 | study (s) | × torch fp32 "
        "| max \\|Δ\\| | kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        members = list(range(1, len(m.kinds)))
        variants = [[i] for i in members] + ([members] if len(members) > 1 else [])
        for chosen in variants:
            label = f"{m.name}: " + " + ".join(m.backbones[i] for i in [0, *chosen])
            for b in backends:
                p, d = m.phases(b, chosen), m.worst(b, chosen)
                cells = [label, b, *(f"{v:.2f}" for v in p.values()), f"**{sum(p.values()):.1f}**",
                         f"{m.total(BASE, chosen) / m.total(b, chosen):.2f}×", f"{d:.0e}",
                         "yes" if _kept(b, d) else "**no**"]  # fmt: skip
                out.append("| " + " | ".join(cells) + " |")
            pick = per_phase(m, backends, chosen)
            t = m.composite(pick, chosen)
            where = ", ".join(f"{r.replace(' ', ' ')}: {b}" for r, b in pick.items())
            out.append(f"| {label} | each call on its fastest kept backend ({where}) | | | | | **{t:.1f}** | "
                       f"{m.total(BASE, chosen) / t:.2f}× | | yes |")  # fmt: skip
    what = {
        f"{m.name} [{i}]": m.work.calls[f"stage 2 [{i}]"][2] for m in measured for i in range(1, len(m.kinds))
    }
    out += ["", "Stage 1: " + "; ".join(f"{m.name}: {m.work.n1}" for m in measured) + ". Stage 2: "]
    out[-1] += "; ".join(f"{k}: {v}" for k, v in what.items()) + "."
    return "\n".join(out) + "\n"


def main() -> None:
    from cervspine.cpu import resolve_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 backends, 1 repeat (a smoke run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    ap.add_argument("--threads", default="auto", help="intra-op threads: auto (predict's default) or N")
    ap.add_argument(
        "--table", type=Path, default=None, help=f"the phase table (default: {TABLE.name}, not --quick)"
    )
    args = ap.parse_args()
    t_start = time.perf_counter()
    backends = QUICK_BACKENDS if args.quick else BACKENDS
    from cervspine.io import load_study

    folder = bench_study("explicit", n_slices=N_SLICES, slice_spacing=SPACING_MM)
    made = bundles(load_study(folder))
    threads = resolve_threads(args.threads)
    print(f"    threads: {args.threads} = {threads} (load average {os.getloadavg()[0]:.1f})", flush=True)
    rows: list[Row] = []
    measured = []
    for name, (bundle, ckpts) in made.items():
        got = measure(name, bundle, ckpts, folder, threads, backends, args.quick)
        measured.append(got)
        rows += rows_of(got, backends, threads, args.quick)
        if name == "production":
            rows += design_rows(got, folder, bundle, ckpts, threads, args.quick)
        print(f"    {name}: done ({(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
    demo_bundle, demo_ckpts = made["demo"]
    rows += threads_rows(bench_study("explicit", size=256, n_slices=120), demo_bundle, demo_ckpts, args.quick)
    path = args.table or (None if args.quick else TABLE)
    if path is not None:
        text = table(measured, backends, threads, args.quick, time.perf_counter() - t_start)
        path.write_text(text)
        print(text)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
