"""Exporting trained stages as a bundle: a folder with one ONNX graph per model (two for the column
model), a manifest holding everything inference needs (:mod:`cervspine.bundle.manifest`) and the model
card; optionally the checkpoints themselves (``backend=torch`` from a bundle).

The stages are read back through the torch strategies (:func:`cervspine.inference.load_stage1` /
``load_stage2``), so the manifest's input settings are exactly what the torch path uses; each graph is
checked against its module on ONNX Runtime before the bundle is written (``export_check``)."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cervspine import __version__
from cervspine.bundle.graphs import (
    OPSET,
    ColumnEncoderGraph,
    ColumnReaderGraph,
    GraphSpec,
    SequenceGraph,
    SliceClassifierGraph,
    SliceDetectorGraph,
    export_graph,
    plain,
)
from cervspine.bundle.manifest import FORMAT, MANIFEST, VERSION, sha256, spec_record, write_manifest
from cervspine.inference import Predictor, Runtime, load_stage1, load_stage2
from cervspine.io.rsna import trained_on_synthetic_data
from cervspine.scoring.answer import ENSEMBLE_RULE
from cervspine.scoring.thresholds import OperatingPoint

CHECK_TOLERANCE = 1e-4  # max |Δ| of a graph's outputs against its module on the export's example inputs
ROUNDING_FACTOR = 10  # … or this many times the module's sensitivity to ~2-ulp input changes there


def stage_graphs(stage: Any, role: str) -> dict[str, GraphSpec]:
    """The graphs of one loaded torch strategy, with example inputs of its real sizes."""
    model = plain(stage.model)
    kind = stage.kind
    if role == "stage1" and kind == "slice":
        s = stage.stack
        x = torch.rand(2, s.channels, s.input_size, s.input_size)
        return {
            "model": GraphSpec(SliceDetectorGraph(model), {"image": x}, ["visibility", "box"], _dyn("image"))
        }
    if role == "stage1" and kind == "column":
        s = stage.sampler
        x = torch.rand(2, s.channels, s.input_size, s.input_size)
        with torch.no_grad():
            width = model.encode(x).shape[-1]
        length = {0: "batch", 1: "length"}
        reader_inputs = {
            "features": torch.randn(1, 9, width),
            "lengths": torch.tensor([9], dtype=torch.int64),
            "step_mm": torch.tensor([2.0]),
        }
        reader_dyn = {"features": length, "visibility": length, "box": length, **_dyn("lengths", "step_mm")}
        return {
            "encoder": GraphSpec(ColumnEncoderGraph(model), {"slices": x}, ["features"], _dyn("slices")),
            "reader": GraphSpec(ColumnReaderGraph(model), reader_inputs, ["visibility", "box"], reader_dyn),
        }
    if role == "stage2" and kind == "slice":
        s = stage.stack
        x = torch.rand(2, s.channels, s.input_size, s.input_size)
        meta = torch.randn(2, int(model.hparams["num_meta"]))
        inputs = {"image": x, "meta": meta}
        return {"model": GraphSpec(SliceClassifierGraph(model), inputs, ["fracture"], _dyn("image", "meta"))}
    if role == "stage2" and kind == "sequence":
        c = stage.cropper  # traced on 2 slices a sequence (cheap at 384²): the slice axis is dynamic
        x = torch.rand(1, 7, 2, c.channels, c.input_size, c.input_size)
        outputs = ["vertebra"] + (["overall"] if model.study_head is not None else [])
        inputs = {"image": x, "present": torch.ones(1, 7)}
        dyn = {"image": {0: "batch", 2: "slices"}, "present": {0: "batch"}}
        return {"model": GraphSpec(SequenceGraph(model), inputs, outputs, dyn)}
    raise ValueError(f"no export for a {role} model of kind {kind!r}")


def _dyn(*names: str) -> dict[str, dict[int, str]]:
    """``names`` with a dynamic batch axis."""
    return {n: {0: "batch"} for n in names}


def _outputs(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def check_graph(spec: GraphSpec, path: Path) -> float:
    """max |Δ| between the graph on ONNX Runtime and the module, on the example inputs (NaN: no
    onnxruntime here)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return float("nan")
    with torch.no_grad():
        ref = _outputs(spec.module(*spec.inputs.values()))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: spec.inputs[i.name].numpy() for i in sess.get_inputs()}
    got = sess.run(None, feeds)
    return float(max(np.abs(g - r.numpy()).max() for g, r in zip(got, ref)))


def sensitivity(spec: GraphSpec) -> float:
    """max |Δ| of the module's outputs when its float inputs move by ~2 float32 ulps (relative 2^-22,
    Gaussian, a fixed seed), on the example inputs: how much the model's own arithmetic amplifies
    rounding there. The example inputs are uniform noise, not CT: a network whose BatchNorm statistics
    are those of CT (any trained one) can be ill-conditioned on them, and then any two float32
    computations of it — torch's and the graph's — differ by about this much without either being
    wrong. (float64 would tell the same, but the models cast to float32 inside.)"""
    gen = torch.Generator().manual_seed(0)

    def nudged(v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v
        return v * (1 + 2.0**-22 * torch.randn(v.shape, generator=gen, dtype=v.dtype))

    with torch.no_grad():
        ref = _outputs(spec.module(*spec.inputs.values()))
        moved = _outputs(spec.module(*(nudged(v) for v in spec.inputs.values())))
    return float(max((a - b).abs().max() for a, b in zip(ref, moved)))


def stage_record(stage: Any, role: str, graphs: dict[str, dict], source: Path) -> dict[str, Any]:
    """A stage's manifest entry: what it is, its graphs, its input settings, its post-processing."""
    hp = stage.data_hp or {}
    root = hp.get("root")
    rec: dict[str, Any] = {
        "kind": stage.kind,
        "model_class": type(stage.model).__name__,
        "backbone": stage.backbone,
        "source": {"checkpoint": str(source), "sha256": sha256(source)},
        "graphs": graphs,
        "training": {"data_root": root, "synthetic": trained_on_synthetic_data(hp)},
    }
    if stage.kind == "column":
        rec["inputs"] = {"sampler": spec_record(stage.sampler, channels=stage.sampler.channels)}
    elif stage.kind == "sequence":
        c = stage.cropper
        rec["inputs"] = {"cropper": spec_record(c, channels=c.channels)}
        rec["prior"] = stage.model.training_prior()
    else:
        s = stage.stack
        rec["inputs"] = {
            "stack": spec_record(s, offsets=s.offsets, hu_windows=s.hu_windows, channels=s.channels)
        }
    if role == "stage2" and stage.kind == "slice":
        m = stage.model
        rec["inputs"]["crop"] = spec_record(stage.spec)
        rec["aggregation"] = stage.aggregation
        rec["calibration"] = {
            "applies": bool(stage.calibrated),
            "params": m.study_calibration.tolist(),
            "shrink": m.calibration_shrink.tolist(),
        }
        rec["prior"] = m.training_prior()
    return rec


def export_bundle(
    out: str | Path,
    stage1: str | Path,
    stage2: str | Path | Sequence[str | Path],
    *,
    operating_point: dict[str, Any] | None = None,
    model_card: str | Path | None = None,
    include_checkpoints: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the bundle of ``stage1`` and the stage-2 checkpoint(s) to ``out`` (built in a temporary
    sibling and moved into place); returns the manifest's path."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (overwrite=true replaces it)")
    paths = [Path(stage2)] if isinstance(stage2, (str, Path)) else [Path(p) for p in stage2]
    rt = Runtime.create("cpu")
    predictor = Predictor(load_stage1(stage1, rt), [load_stage2(p, rt) for p in paths], rt)  # checks sizes
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write_contents(tmp, predictor, Path(stage1), paths, operating_point, include_checkpoints)
        _write_card(tmp / "MODEL_CARD.md", manifest, model_card)
        manifest["model_card"] = "MODEL_CARD.md"
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / MANIFEST


def _write_contents(
    folder: Path,
    predictor: Predictor,
    stage1: Path,
    stage2: list[Path],
    operating_point: dict[str, Any] | None,
    include_checkpoints: bool,
) -> dict[str, Any]:
    import onnx

    from cervspine.runs.info import git_commit

    checks: dict[str, float] = {}
    gaps: dict[str, float] = {}
    limits: dict[str, float] = {}

    def export(stage: Any, role: str, prefix: str, source: Path) -> dict[str, Any]:
        records = {}
        for name, spec in stage_graphs(stage, role).items():
            file = f"{prefix}.onnx" if name == "model" else f"{prefix}_{name}.onnx"
            export_graph(spec, folder / file)
            checks[file] = check_graph(spec, folder / file)
            limits[file] = CHECK_TOLERANCE
            if checks[file] > CHECK_TOLERANCE:  # rounding amplified, or a wrong graph?
                gaps[file] = sensitivity(spec)
                limits[file] = max(CHECK_TOLERANCE, ROUNDING_FACTOR * gaps[file])
            if checks[file] > limits[file]:
                gap = (
                    f" (its sensitivity to 2-ulp input changes there: {gaps[file]:.2e})"
                    if file in gaps
                    else ""
                )
                raise RuntimeError(
                    f"{file}: ONNX Runtime differs from torch by {checks[file]:.2e} on the export{gap}"
                )
            records[name] = spec.record(file)
        return stage_record(stage, role, records, source)

    s1 = export(predictor.stage1, "stage1", "stage1", stage1)
    s2 = [export(m, "stage2", f"stage2_{i}", p) for i, (m, p) in enumerate(zip(predictor.stage2, stage2))]
    checkpoints = None
    if include_checkpoints:
        (folder / "checkpoints").mkdir()
        names = ["stage1.ckpt", *(f"stage2_{i}.ckpt" for i in range(len(stage2)))]
        for src, name in zip([stage1, *stage2], names):
            shutil.copy2(src, folder / "checkpoints" / name)
        checkpoints = {"stage1": f"checkpoints/{names[0]}", "stage2": [f"checkpoints/{n}" for n in names[1:]]}
    stages = [s1, *s2]
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cervspine": {"version": __version__, "git_commit": git_commit()},
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET},
        "export_check": {"max_abs_diff": checks, "tolerance": limits, "sensitivity": gaps},
        "image_size": predictor.image_size,
        "synthetic": any(s["training"]["synthetic"] for s in stages),
        "stage1": s1,
        "stage2": s2,
        "ensemble": {"members": len(s2), "rule": ENSEMBLE_RULE if len(s2) > 1 else "one model"},
        "operating_point": operating_point,
        "checkpoints": checkpoints,
    }


def _write_card(path: Path, manifest: dict[str, Any], source: str | Path | None) -> None:
    """The run's model card (when there is one) and what this bundle holds."""
    text = Path(source).read_text() if source and Path(source).is_file() else "# Model card\n\nNo card.\n"
    op = manifest.get("operating_point")
    t = OperatingPoint.from_dict(op).thresholds() if op else None
    lines = [
        "",
        "## This bundle",
        "",
        f"Exported {manifest['created']} by cervspine {manifest['cervspine']['version']} "
        f"(git {manifest['cervspine']['git_commit']}), torch {manifest['exported_with']['torch']}, "
        f"ONNX opset {manifest['exported_with']['opset']}; manifest version {manifest['version']}.",
        f"Studies are read at {manifest['image_size']}² (the training caches' size).",
        "",
        "| role | model | backbone | graphs | inputs |",
        "|---|---|---|---|---|",
    ]
    for role, rec in [
        ("stage 1", manifest["stage1"]),
        *((f"stage 2 [{i}]", r) for i, r in enumerate(manifest["stage2"])),
    ]:
        files = ", ".join(g["file"] for g in rec["graphs"].values())
        spec = next(iter(rec["inputs"].values()))
        lines.append(
            f"| {role} | {rec['model_class']} | {rec['backbone']} | {files} | "
            f"{spec.get('input_size')}², windows {spec.get('hu_windows') or spec.get('windows')} |"
        )
    lines += [
        "",
        f"Stage 2: {manifest['ensemble']['rule']}.",
        "Operating point: "
        + (
            f"p > {t.vertebra:.4f} (C1–C7), p > {t.patient:.4f} (patient); {t.rule}."
            if t is not None
            else "none (the run had no operating_point.json)."
        ),
        "",
        "Research software, NOT FOR DIAGNOSTIC USE."
        + (
            " SYNTHETIC: trained on generated data; says nothing about real CT."
            if manifest["synthetic"]
            else ""
        ),
        "",
    ]
    path.write_text(text.rstrip() + "\n" + "\n".join(lines))


def export_run(
    out: str | Path,
    run_dir: str | Path | None = None,
    stage1: str | Path | None = None,
    stage2: str | Path | Sequence[str | Path] | None = None,
    *,
    operating_point: str | Path | None = None,
    model_card: str | Path | None = None,
    include_checkpoints: bool = False,
    overwrite: bool = False,
) -> Path:
    """The bundle of a pipeline run (its best stage-1 and stage-2 checkpoints, ensemble members
    included, its operating_point.json and MODEL_CARD.md), or of explicit checkpoints (which win, as in
    predict). ``operating_point``/``model_card``: other files than the run's."""
    from cervspine.jobs.operating_point import load_operating_point
    from cervspine.runs.layout import stage_checkpoints

    s1, s2 = stage_checkpoints(run_dir, stage1, stage2)
    run = Path(run_dir) if run_dir else None
    op_path = Path(operating_point) if operating_point else (run / "operating_point.json" if run else None)
    op = (
        load_operating_point(op_path).as_dict()
        if op_path and (operating_point or op_path.is_file())
        else None
    )
    card = Path(model_card) if model_card else (run / "MODEL_CARD.md" if run else None)
    return export_bundle(
        out,
        s1,
        s2,
        operating_point=op,
        model_card=card,
        include_checkpoints=include_checkpoints,
        overwrite=overwrite,
    )


def save_checkpoint(module: torch.nn.Module, data_hp: dict[str, Any], path: str | Path) -> Path:
    """``module`` (a cervspine LightningModule, e.g. randomly initialised) as a checkpoint the stages load:
    its weights, hyper-parameters and class, with the data hyper-parameters ``data_hp`` (benchmarks and
    tests of the export: equality with torch does not need trained weights)."""
    import lightning

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": dict(data_hp),
        "pytorch-lightning_version": lightning.__version__,
        "model_class": type(module).__name__,
    }
    torch.save(ckpt, path)
    return path
