"""The real-data job rehearsed at real sizes: ``make rehearsal`` (``python -m experiments.rehearsal``).

Synthesizes an RSNA-format folder at the real study sizes (512², 200–400 slices of 0.5–1 mm, 60% Explicit VR
Little Endian / 40% JPEG Lossless), builds its cache with ``experiment=rsna``'s cache settings (timed), runs
``python -m cervspine.pipeline experiment=rsna`` on it with step limits (every step timed; each stage's
training with :class:`~cervspine.training.callbacks.ThroughputMonitor`), measures each stage's loader
cost per sample on one core, and writes ``experiments/rehearsal.md`` + ``.json``: the measured figures and
their projection to the full RSNA set beside the goals (one fold ≤ 6 h on one H100-class GPU; cache ≤ 120
GB).

``--mode gpu`` (the default where CUDA is present): the recipes' own batch sizes, bf16, ~8 minutes.
``--mode cpu``: the same job at the same image sizes with small batches, a few steps per stage, fp32, no
pretrained weights (nothing is downloaded), ~10–15 minutes on 2 cores. A CPU's samples/s say nothing of a
GPU's: there the table gives the GPU throughput each stage needs for the 6 h budget and a published
figure (timm's benchmark) beside it, labelled as projections.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent

# The full RSNA 2022 set and one fold of it (DESIGN.md §3; conf/pipelines/experiment/rsna.yaml's header)
FULL = {
    "studies": 2019,
    "slices": 711_000,
    "test_studies": 1500,  # the hidden test set, scored by predict
    "val_studies": 404,  # one fold of five: evaluate
    "stage1_train_studies": 87,  # the segmented ones
    "stage1_epochs": 20,
    "stage1_columns_per_epoch": 2000,
    "seq_vertebrae_per_epoch": 11_300,  # 2,019 × 7 × 4/5
    "seq_epochs": 15,
    "slice_samples_per_epoch": 40_000,
    "slice_epochs": 15,
}
GOALS = {"fold_hours": 6.0, "cache_gb": 120.0}
# The 6 h of one fold split over the steps (what each stage must fit in for the goal)
BUDGET_H = {"train_stage1": 0.75, "stage1_inference": 0.25, "train_stage2": 2.75, "train_stage2_slice": 1.75,
            "evaluate": 0.5}  # fmt: skip
# timm's published training throughput (AMP, channels-last, PyTorch 1.12, one RTX 3090): huggingface/
# pytorch-image-models results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv (commit c865028c). No
# A100/H100 training CSV is published; an H100 is faster than a 3090, so these are floors.
TIMM_3090_TRAIN = {
    "efficientnet_b0": (1751.72, 224),
    "tf_efficientnetv2_s": (488.25, 300),
    "tf_efficientnet_b5": (111.42, 456),
}
STAGE1_SAMPLES = FULL["stage1_epochs"] * FULL["stage1_columns_per_epoch"]
SEQ_SAMPLES = FULL["seq_epochs"] * FULL["seq_vertebrae_per_epoch"]
SLICE_SAMPLES = FULL["slice_epochs"] * FULL["slice_samples_per_epoch"]
STAGES = {  # pipeline step → (stage key, backbone, input size, samples of one fold's training)
    "train_stage1": ("stage1", "efficientnet_b0", 192, STAGE1_SAMPLES),
    "train_stage2": ("stage2", "tf_efficientnetv2_s", 224, SEQ_SAMPLES),
    "train_stage2_slice": ("stage2_ensemble.slice", "tf_efficientnet_b5", 384, SLICE_SAMPLES),
}
# 2-D images a training sample holds in the recipes (the CPU mode cuts fracture_seq's 15 to 4; stage 1's
# column length is measured: the positions of a random part of each column)
RECIPE_IMAGES = {"train_stage2": 15, "train_stage2_slice": 1}
TRANSFER_SYNTAX = {"explicit": 0.6, "jpeg_lossless": 0.4, "implicit": 0.0, "rle": 0.0, "jpeg2000": 0.0}

MODES = {
    "cpu": {
        "n_train": 8,
        "n_test": 2,
        "n_folds": 2,  # 4 validation studies: at least one of them segmented (6 of the 8 are)
        "train_batches": 3,
        "pipeline": [
            "device=cpu",
            "workers=2",
            "batch_size=16",
            "n_bootstrap=20",
            "stage1_inference.processes=1",
        ],
        # memory, not time, sets these on a 2-core, 23 GB machine: fp32 activations of real-size inputs
        # (stage 1 with 2 columns peaked at 10.6 GB; fracture_seq with 2 sequences of 15 crops of 384² was
        # killed at 14 GB): one column, one sequence of 4 crops, 2 slices a batch
        "stage1": ["data.batch_size=1", "data.val_batch_size=1"],
        "stage2": ["data.batch_size=1", "data.n_slices=4", "trainer.accumulate_grad_batches=1"],
        "slice": ["data.batch_size=2"],
        "stages": [
            "trainer=cpu",
            "trainer.precision=32-true",
            "data.num_workers=2",
            "data.preprocess_workers=2",
        ],
        "predict": ["num_threads=2"],
    },
    "gpu": {
        "n_train": 24,
        "n_test": 4,
        "n_folds": 4,
        "train_batches": 40,
        "pipeline": [
            "device=cuda",
            "workers=8",
            "batch_size=64",
            "n_bootstrap=200",
            "stage1_inference.processes=1",
        ],
        "stage1": [],
        "stage2": [],
        "slice": [],
        "stages": ["data.num_workers=8", "data.preprocess_workers=8"],
        "predict": [],
    },
}


def _quoted(items: list[str]) -> str:
    return json.dumps(items)


def pipeline_overrides(mode: str, root: Path, cache: Path) -> list[str]:
    m = MODES[mode]
    stages = [
        *m["stages"],
        "trainer.max_epochs=1",
        f"++trainer.limit_train_batches={m['train_batches']}",
        "++trainer.limit_val_batches=2",
        "++trainer.enable_progress_bar=false",
        "model.backbone.pretrained=false",  # no downloads: the run measures speed, not learning
        "model.backbone.weights_path=null",
        "model.compile=false",
        "+callbacks.throughput._target_=cervspine.training.callbacks.ThroughputMonitor",
    ]
    return [
        "experiment=rsna",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        f"data.n_folds={m['n_folds']}",
        "force=true",
        "progress=false",
        *m["pipeline"],
        f"stage1.overrides={_quoted(m['stage1'])}",
        f"stage2.overrides={_quoted(m['stage2'])}",
        f"stage2_ensemble.slice.overrides={_quoted(m['slice'])}",
        f"stages_overrides={_quoted(stages)}",
        f"predict.overrides={_quoted(m['predict'])}",
    ]


def synthesize(root: Path, mode: str, seed: int = 7) -> float:
    """The folder at real sizes (once); seconds it took (0 when it was there)."""
    if (root / "synthetic_manifest.csv").is_file():
        return 0.0
    m = MODES[mode]
    ts = [f"quirks.transfer_syntax.{k}={v}" for k, v in TRANSFER_SYNTAX.items()]
    cmd = [sys.executable, "-m", "cervspine.synthesize", f"out={root}", f"n_train={m['n_train']}",
           f"n_test={m['n_test']}", "size=512", "slices=[200,400]", "spacing=[0.5,1.0]", f"seed={seed}",
           "seg_fraction=0.75", "positive_fraction=0.5", "workers=2", "overwrite=true", *ts]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - t


def build_cache(cfg, workers: int) -> dict[str, Any]:
    """Preprocess every study with the job's cache settings, from an empty cache folder: timed."""
    from cervspine.cache import CacheParams, preprocess
    from cervspine.io.rsna import RsnaIndex

    cache = Path(cfg.data.cache_dir)
    shutil.rmtree(cache, ignore_errors=True)
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude))
    params = CacheParams.from_config(cfg.data)
    t = time.perf_counter()
    report = preprocess(index, cache, params, workers=workers, progress=False)
    elapsed = time.perf_counter() - t
    if not report.ok:
        raise RuntimeError(f"preprocessing failed: {report.failed}")
    entries = [cache / u for u in report.built]
    stored = sum(p.stat().st_size for e in entries for p in e.iterdir() if p.is_file())
    volume = sum((e / "volume.cvol").stat().st_size for e in entries if (e / "volume.cvol").is_file())
    slices = sum(json.loads((e / "meta.json").read_text())["shape"][0] for e in entries)
    return {
        "studies": len(entries),
        "slices": int(slices),
        "seconds": elapsed,
        "workers": workers,
        "studies_per_min": len(entries) / elapsed * 60,
        "bytes_per_study": stored / len(entries),
        "bytes_per_slice": stored / slices,
        "volume_bytes_per_slice": volume / slices,
        "uncompressed_bytes_per_slice": 512 * 512 * 2,
        "params": {"compression": params.compression, "hu_floor": params.hu_floor, **params.key()},
    }


@contextlib.contextmanager
def timed_steps():
    """Wall time of every pipeline step (Steps.run)."""
    from cervspine.jobs.steps import Steps

    times: dict[str, float] = {}
    real = Steps.run

    def run(self, name, key, outputs, fn):
        t = time.perf_counter()
        try:
            return real(self, name, key, outputs, fn)
        finally:
            times[name] = time.perf_counter() - t

    Steps.run = run
    try:
        yield times
    finally:
        Steps.run = real


def loader_cost(cfg, run_dir: Path, n: int = 4) -> dict[str, dict]:
    """Each stage's training samples built in this process (one core, no workers): s a sample."""
    from hydra.utils import instantiate

    from cervspine.jobs.pipeline import stage_config, stage_keys

    out = {}
    table = run_dir / "stage1_predictions.parquet"
    for stage in stage_keys(cfg):
        extra = {} if stage == "stage1" else {"stage1_predictions": str(table)}
        s_cfg = stage_config(cfg, stage, run_dir / "loader_probe", extra)
        dm = instantiate(s_cfg.data)
        dm.setup("fit")
        dl = dm.train_dataloader()
        ds = dl.dataset
        order = list(iter(dl.sampler))[:n] if getattr(dl, "sampler", None) is not None else list(range(n))
        ds[order[0]]  # warm (file maps, first decode)
        t = time.perf_counter()
        for i in order[1:]:
            ds[i]
        per = (time.perf_counter() - t) / max(len(order) - 1, 1)
        out[stage] = {
            "s_per_sample": per,
            "samples": len(order) - 1,
            "images_per_sample": _images(ds[order[0]]),
        }
    shutil.rmtree(run_dir / "loader_probe", ignore_errors=True)
    return out


def _images(sample: dict) -> int:
    """2-D images per sample: every dimension of ``image`` before (C, H, W)."""
    shape = tuple(sample["image"].shape)
    return int(np.prod(shape[:-3])) if len(shape) > 3 else 1


def run_pipeline(mode: str, root: Path, cache: Path, run_dir: Path) -> dict[str, Any]:
    from cervspine.config import composed
    from cervspine.pipeline import run

    overrides = pipeline_overrides(mode, root, cache)
    with composed("pipeline", overrides, run_dir) as cfg:
        cache_info = build_cache(cfg, int(cfg.workers))
        with timed_steps() as times:
            t = time.perf_counter()
            result = run(cfg)
            total = time.perf_counter() - t
        loaders = loader_cost(cfg, run_dir)
        n_val = _n_val(cfg)
    return {"overrides": overrides, "cache": cache_info, "steps_s": times, "pipeline_s": total,
            "loaders": loaders, "n_val": n_val, "submission": str(result.get("submission"))}  # fmt: skip


def _n_val(cfg) -> int:
    from cervspine.data.folds import assign_folds
    from cervspine.io.rsna import RsnaIndex

    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude))
    folds = assign_folds(index.labels, int(cfg.data.n_folds), int(cfg.data.fold_seed))
    return int((folds == int(cfg.data.fold)).sum())


def collect(run_dir: Path, measured: dict[str, Any]) -> dict[str, Any]:
    """The stages' throughput.json, the studies' timings, the counts the projections need."""
    stages = {}
    for step, (key, backbone, size, _) in STAGES.items():
        folder = run_dir / ("stage1" if key == "stage1" else "stage2" if key == "stage2" else "stage2_slice")
        tp = folder / "throughput.json"
        stages[step] = {"dir": folder.name, "backbone": backbone, "input_size": size,
                        **(json.loads(tp.read_text()) if tp.is_file() else {"missing": str(tp)})}  # fmt: skip
        stages[step]["images_per_sample"] = measured["loaders"].get(key, {}).get("images_per_sample")
    studies = [json.loads(p.read_text()) for p in sorted(run_dir.glob("studies/*.json"))]
    per_study = [sum(s.get("timings_s", {}).values()) for s in studies]
    return {"stages": stages, "predict_model_s_per_study": float(np.mean(per_study)) if per_study else None,
            "n_test": len(studies)}  # fmt: skip


def project(mode: str, measured: dict, collected: dict, codecs: dict | None) -> dict[str, Any]:
    """Each measured figure × the full set's counts, and what each stage needs for the 6 h goal."""
    cache, steps = measured["cache"], measured["steps_s"]
    slices_run = cache["slices"]
    out: dict[str, Any] = {"mode": mode}
    out["preprocess"] = {
        "studies_per_min": cache["studies_per_min"],
        "full_set_hours": FULL["studies"] / cache["studies_per_min"] / 60,
        "workers": cache["workers"],
    }
    real = None
    if codecs:
        real = next((s for s in codecs["summary"] if (s["codec"], s["max_error_hu"], s["hu_floor"]) ==
                     (cache["params"]["compression"], 0, cache["params"]["hu_floor"])), None)  # fmt: skip
    out["cache"] = {
        "synthetic_bytes_per_slice": cache["bytes_per_slice"],
        "synthetic_full_set_gb": cache["bytes_per_slice"] * FULL["slices"] / 1e9,
        "real_ct_bytes_per_slice": real and real["bytes_per_slice_mean"],
        "real_ct_full_set_gb": real and real["full_set_gb_mean"],
        "real_ct_full_set_gb_neck": real and real["full_set_gb_neck"],
        "goal_gb": GOALS["cache_gb"],
    }
    s1 = steps.get("stage1_inference")
    out["stage1_inference"] = {
        "slices_per_s": slices_run / s1 if s1 else None,
        "full_set_hours": FULL["slices"] / (slices_run / s1) / 3600 if s1 else None,
        "budget_h": BUDGET_H["stage1_inference"],
        "required_slices_per_s": FULL["slices"] / (BUDGET_H["stage1_inference"] * 3600),
    }
    model_s = collected["predict_model_s_per_study"]
    n_test = max(collected["n_test"], 1)
    out["predict"] = {
        "model_s_per_study": model_s,
        "step_s_per_study": steps.get("predict", 0) / n_test,
        "hidden_test_hours": model_s * FULL["test_studies"] / 3600 if model_s else None,
        "evaluate_s_per_study": steps.get("evaluate", 0) / max(measured["n_val"], 1),
        "val_fold_hours": steps.get("evaluate", 0) / max(measured["n_val"], 1) * FULL["val_studies"] / 3600,
        "budget_h": BUDGET_H["evaluate"],
    }
    out["stages"] = {}
    for step, (key, backbone, size, samples) in STAGES.items():
        st = collected["stages"][step]
        rate = st.get("train_samples_per_s")
        imgs = RECIPE_IMAGES.get(step) or st.get("images_per_sample") or 1
        need = samples / (BUDGET_H[step] * 3600)
        timm_rate, timm_size = TIMM_3090_TRAIN[backbone]
        timm_at_size = timm_rate * (timm_size / size) ** 2  # compute ∝ pixels: a first-order scaling
        loader = measured["loaders"].get(key, {})
        per_image = (
            loader["s_per_sample"] / loader["images_per_sample"] if loader.get("s_per_sample") else None
        )
        out["stages"][step] = {
            "backbone": backbone,
            "input_size": size,
            "fold_samples": samples,
            "images_per_sample": imgs,
            "measured_samples_per_s": rate,
            "measured_full_hours": samples / rate / 3600 if rate else None,
            "peak_gpu_gib": st.get("peak_gpu_gib"),
            "peak_rss_gib": st.get("peak_rss_gib"),
            "waited_fraction": st.get("waited_fraction"),
            "wait_time_fraction": st.get("wait_time_fraction"),
            "budget_h": BUDGET_H[step],
            "required_samples_per_s": need,
            "required_images_per_s": need * imgs,
            "timm_3090_images_per_s_at_size": timm_at_size,
            "timm_3090_hours": samples * imgs / timm_at_size / 3600,
            "loader_s_per_sample_1core": loader.get("s_per_sample"),
            "loader_images_per_sample": loader.get("images_per_sample"),
            "loader_cores_for_required": need * imgs * per_image if per_image else None,
        }
    return out


def _f(v, fmt: str = ".1f", none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def markdown(result: dict) -> str:
    p, m = result["projection"], result["measured"]
    c = m["cache"]
    lines = [
        f"# Rehearsal of `experiment=rsna` at real sizes ({p['mode'].upper()})",
        "",
        f"`make rehearsal` (`python -m experiments.rehearsal --mode {p['mode']}`), {result['when']}, "
        f"{result['machine']}. Synthetic RSNA folder: {c['studies']} studies, {c['slices']:,} slices of 512² "
        "(200–400 slices of 0.5–1 mm; 60% Explicit VR Little Endian, 40% JPEG Lossless), "
        f"`experiment=rsna` with {MODES[p['mode']]['train_batches']} training batches per stage "
        f"(pipeline {m['pipeline_s'] / 60:.1f} min).",
    ]
    if result.get("note"):
        lines += ["", result["note"]]
    if p["mode"] == "cpu":
        lines += [
            "",
            "**CPU mode**: fp32, small batches (stage 1: 1 column, fracture_seq: 1 vertebra sequence of 4 "
            "crops instead of 15, fracture_b5: 2 slices: the memory of a 23 GB machine), random init. "
            "Its samples/s measure this CPU, not a GPU: for the 6 h "
            "goal the table gives what a GPU must reach per stage (**required**) and timm's published RTX "
            "3090 training throughput scaled to the input size by pixel count (**projection**, not a "
            "measurement; an H100 is faster than a 3090). Peak memory: the resident memory of the "
            "pipeline process with its loader workers; the stages train in that one process, so a later "
            "stage's figure includes what the earlier ones left allocated. The machine was shared (load "
            "average above 2 on 2 cores, see the first line): every CPU time here is pessimistic. The "
            "CPU rows of stage-1 inference and predict are this CPU's; the GPU's needs are beside them.",
        ]
    lines += [
        "",
        "## Measured, and projected to the full set",
        "",
        "| what | measured here | full set (projection) | goal / budget |",
        "|---|---|---|---|",
        f"| preprocess | {p['preprocess']['studies_per_min']:.1f} studies/min ({p['preprocess']['workers']} "
        f"workers) | {p['preprocess']['full_set_hours']:.1f} h for {FULL['studies']:,} studies at that rate "
        "(scales with workers / `shard=i/N` jobs) | – |",
        f"| cache bytes/study | {c['bytes_per_study'] / 1e6:.1f} MB ({c['bytes_per_slice'] / 1e3:.0f} kB a "
        f"slice, {c['params']['compression']}, floor {c['params']['hu_floor']} HU; the synthetic phantom "
        f"compresses unrealistically) | real CT: {_f(p['cache']['real_ct_bytes_per_slice'], ',.0f')} B a "
        "slice → "
        f"**{_f(p['cache']['real_ct_full_set_gb'], '.0f')} GB** (spine-zoomed neck: "
        f"{_f(p['cache']['real_ct_full_set_gb_neck'], '.0f')} GB; rehearsal_codecs.md) | "
        f"≤ {GOALS['cache_gb']:.0f} GB |",
    ]  # fmt: skip
    s1 = p["stage1_inference"]
    lines.append(
        f"| stage-1 inference | {_f(s1['slices_per_s'], ',.0f')} slices/s (study slices covered, 2 mm "
        f"steps; {p['mode'].upper()}) | {_f(s1['full_set_hours'], '.2f')} h at that rate; the budget needs "
        f"{s1['required_slices_per_s']:,.0f} slices/s | {s1['budget_h']} h |"
    )
    pr = p["predict"]
    lines.append(
        f"| predict | {_f(pr['model_s_per_study'], '.1f')} s/study models ({p['mode'].upper()}) "
        f"({_f(pr['step_s_per_study'], '.1f')} s with loading) | {_f(pr['hidden_test_hours'], '.1f')} h "
        f"for {FULL['test_studies']:,} test studies; "
        f"evaluate of one fold ({FULL['val_studies']} studies): {_f(pr['val_fold_hours'], '.1f')} h | "
        f"{pr['budget_h']} h (evaluate) |"
    )  # fmt: skip
    lines += [
        "",
        "## Training, per stage",
        "",
        "| stage | backbone @ input | samples of one fold | measured samples/s | peak memory GiB | steps "
        "that waited on the loader (wait share of time) | loader s/sample (1 core) | **required** for the "
        "budget | timm RTX 3090 **projection** | loader cores for the required rate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step, s in p["stages"].items():
        mem = s["peak_gpu_gib"] if s["peak_gpu_gib"] is not None else s["peak_rss_gib"]
        kind = "GPU" if s["peak_gpu_gib"] is not None else "RSS"
        lines.append(
            f"| {step} | {s['backbone']} @ {s['input_size']}² ({s['images_per_sample']} images/sample) | "
            f"{s['fold_samples']:,} | {_f(s['measured_samples_per_s'], '.2f')} | {_f(mem, '.1f')} ({kind}) | "
            f"{_f(s['waited_fraction'] and 100 * s['waited_fraction'], '.0f')}% "
            f"({_f(s['wait_time_fraction'] and 100 * s['wait_time_fraction'], '.0f')}%) | "
            f"{_f(s['loader_s_per_sample_1core'], '.2f')} | {s['required_samples_per_s']:.1f} samples/s = "
            f"{s['required_images_per_s']:,.0f} images/s in {s['budget_h']} h | "
            f"{s['timm_3090_images_per_s_at_size']:,.0f} images/s → {s['timm_3090_hours']:.1f} h | "
            f"{_f(s['loader_cores_for_required'], '.1f')} |"
        )  # fmt: skip
    total_3090 = sum(s["timm_3090_hours"] for s in p["stages"].values())
    lines += [
        "",
        f"One fold's training at timm's RTX 3090 rates: {total_3090:.1f} h (+ stage-1 inference and "
        f"evaluate) against the {GOALS['fold_hours']:.0f} h goal on an H100-class GPU. fracture_seq's own "
        "measurement on an H100 (conf/experiment/fracture_seq.yaml: ≈900 crops/s with random inputs) is "
        f"{FULL['seq_epochs'] * FULL['seq_vertebrae_per_epoch'] * 15 / 900 / 3600:.1f} h.",
        "",
        "Timm figures: huggingface/pytorch-image-models "
        "`results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv` (efficientnet_b0 1,752 img/s @224; "
        "tf_efficientnetv2_s 488 @300; tf_efficientnet_b5 111 @456), scaled by (their size / ours)². timm "
        "publishes no A100/H100 training CSV.",
        "",
        "Read the loader column with the decode cost: a compressed cache entry decodes each slice a sample "
        "reads (htj2k ≈ 300–600 slices/s a core, rehearsal_codecs.md); *loader cores for the required "
        "rate* = the required images/s × the loader's seconds an image (measured on this shared CPU: "
        "pessimistic) — the DataLoader workers (`data.num_workers`) one GPU needs.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def machine() -> str:
    import os

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} CPU cores{load}, {gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["auto", "cpu", "gpu"], default="auto")
    ap.add_argument(
        "--work", type=Path, default=None, help="synthetic folder + cache (default data/rehearsal_<mode>)"
    )
    ap.add_argument("--out", type=Path, default=OUT / "rehearsal", help="results: <out>.md and <out>.json")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite <out>.md from <out>.json")
    args = ap.parse_args(argv)
    if args.markdown_only:  # the projection again from the measured figures, and the table
        result = json.loads(args.out.with_suffix(".json").read_text())
        codecs_path = OUT / "rehearsal_codecs.json"
        codecs = json.loads(codecs_path.read_text()) if codecs_path.is_file() else None
        result["projection"] = project(
            result["projection"]["mode"], result["measured"], result["collected"], codecs
        )
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
        return result
    mode = ("gpu" if torch.cuda.is_available() else "cpu") if args.mode == "auto" else args.mode
    work = args.work or REPO / "data" / f"rehearsal_{mode}"
    root, cache, run_dir = work / "rsna", work / "cache", REPO / "outputs" / f"rehearsal_{mode}"
    t0, started = time.perf_counter(), machine()
    synth_s = synthesize(root, mode)
    measured = run_pipeline(mode, root, cache, run_dir)
    measured["synthesize_s"] = synth_s
    collected = collect(run_dir, measured)
    codecs_path = OUT / "rehearsal_codecs.json"
    codecs = json.loads(codecs_path.read_text()) if codecs_path.is_file() else None
    result = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{started} at the start; at the end: {machine()}",
        "full_set": FULL,
        "goals": GOALS,
        "budget_h": BUDGET_H,
        "measured": measured,
        "collected": collected,
        "projection": project(mode, measured, collected, codecs),
        "total_s": time.perf_counter() - t0,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(args.out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
