"""``make gpu-check``: the GPU half of the real-data figures, one script, ≤ 8 minutes on one H100, no network.

Writes ``experiments/benchmarks/gpu_check.json`` and ``gpu_check.md`` (``--out`` moves them). Parts, run in
order while the deadline (``--minutes``, default 8) leaves each its estimated time (a part that would not
fit is recorded as skipped, never cut half-way):

1. **data**: a synthetic RSNA folder at real sizes (512², 200–300 slices of 0.5–1 mm, 8 studies, every
   one segmented) and its cache with the rsna job's settings (HTJ2K, floor −500 HU): made once under
   ``data/gpu_check/``.
2. **train** (the rehearsal's GPU mode, per recipe): ``python -m cervspine.train experiment=R`` for
   ``vertebrae_column``, ``fracture_seq``, ``fracture_b5`` (and ``vertebrae_b5``) at the recipe's own
   batch size, workers, bf16-mixed and channels-last, random init (nothing is downloaded), 30 training
   steps with :class:`~cervspine.training.callbacks.ThroughputMonitor`: samples/s, the share of steps that
   waited on the loader (the loader feeds the GPU when it is ~0), peak GPU memory, peak host memory. The
   hours one fold would take at that rate (``experiments/rehearsal.py``'s sample counts) beside each
   stage's share of the 6 h budget.
3. **inference** (the bench's GPU rows): each recipe's backbone forward on a batch of its inputs, torch
   bf16 (autocast, channels-last) against ONNX Runtime's CUDA and TensorRT providers where installed
   (fp16; the same random-init graph): images/s and max |Δ| of the features against torch fp32.

Without CUDA it composes every recipe and part (what a GPU run would do), prints one line beginning
``gpu-check: no GPU`` and exits (status 0 with ``--dry-run``, else 2: nothing was measured).

    python -m experiments.benchmarks.gpu_check [--dry-run] [--minutes 8] [--out DIR] [--recipes a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
WORK = ROOT / "data" / "gpu_check"
RECIPES = ("vertebrae_column", "fracture_seq", "fracture_b5", "vertebrae_b5")  # the rsna job's three first
STEP_OF = {
    "vertebrae_column": "train_stage1",
    "fracture_seq": "train_stage2",
    "fracture_b5": "train_stage2_slice",
}
TRAIN_STEPS = 30
ESTIMATED_S = {"data": 150, "train": 60, "inference": 25}  # per part (train, inference: per recipe)
TENSORRT_MIN_S = 150  # TensorRT only while this much of the deadline is left (its engine build)
TRAIN_OVERRIDES = [
    "trainer.max_epochs=1",
    f"+trainer.limit_train_batches={TRAIN_STEPS}",
    "+trainer.limit_val_batches=2",
    "++trainer.enable_progress_bar=false",
    "model.backbone.pretrained=false",
    "print_config=false",
    "logger=csv",
    "+callbacks.throughput._target_=cervspine.training.callbacks.ThroughputMonitor",
    "+callbacks.throughput.skip_first=3",
]


def plan(recipes: list[str], root: Path) -> dict[str, dict[str, Any]]:
    """Each recipe's train command and the sizes it trains at, composed as ``cervspine.train`` does."""
    from cervspine.config import composed

    out = {}
    for recipe in recipes:
        overrides = [f"experiment={recipe}", f"data.root={root}", *TRAIN_OVERRIDES]
        with composed("train", overrides, WORK / "compose") as cfg:
            d = cfg.data
            out[recipe] = {
                "overrides": overrides,
                "backbone": str(cfg.model.backbone.name),
                "input_size": int(d.input_size),
                "batch_size": int(d.batch_size),
                "num_workers": int(d.num_workers),
                "images_per_sample": int(d.get("n_slices", 1)) if "n_slices" in d else None,
                "trainer": {
                    "accelerator": str(cfg.trainer.accelerator),
                    "precision": str(cfg.trainer.precision),
                },
                "channels_last": bool(cfg.model.get("channels_last", False)),
            }
    return out


def make_data() -> Path:
    """The folder and its rsna-job cache (once)."""
    root = WORK / "rsna"
    if not (root / "synthetic_manifest.csv").is_file():
        cmd = [
            sys.executable,
            "-m",
            "cervspine.synthesize",
            f"out={root}",
            "n_train=8",
            "n_test=0",
            "size=512",
            "slices=[200,300]",
            "spacing=[0.5,1.0]",
            "seg_fraction=1.0",
            "seed=11",
            "workers=8",
            "overwrite=true",
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    from cervspine.cache import CacheParams, preprocess
    from cervspine.io.rsna import RsnaIndex

    params = CacheParams(image_size=512, compression="htj2k", hu_floor=-500)
    report = preprocess(RsnaIndex.from_root(root), WORK / "cache", params, workers=8, progress=False)
    if not report.ok:
        raise RuntimeError(f"preprocessing the gpu-check folder failed: {report.failed}")
    return root


def cache_overrides(root: Path) -> list[str]:
    return [
        f"data.cache_dir={WORK / 'cache'}",
        "data.cache_compression=htj2k",
        "data.cache_hu_floor=-500",
        "data.n_folds=4",
    ]


def train_part(recipe: str, spec: dict, root: Path, timeout_s: float) -> dict[str, Any]:
    from experiments.rehearsal import BUDGET_H, STAGES

    run_dir = WORK / "runs" / recipe
    cmd = [
        sys.executable,
        "-m",
        "cervspine.train",
        *spec["overrides"],
        *cache_overrides(root),
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0, "exit": proc.returncode}
    tp = run_dir / "throughput.json"
    if proc.returncode or not tp.is_file():
        out["error"] = (proc.stderr or proc.stdout)[-1500:]
        return out
    out.update(json.loads(tp.read_text()))
    step = STEP_OF.get(recipe)
    rate = out.get("train_samples_per_s")
    if step and rate:
        samples = STAGES[step][3]
        out["fold_hours_at_this_rate"] = samples / rate / 3600
        out["budget_h"] = BUDGET_H[step]
    return out


def inference_part(recipe: str, spec: dict, time_left=lambda: float("inf")) -> dict[str, Any]:
    """The backbone's forward on one batch of the recipe's inputs: torch bf16 vs ONNX Runtime GPU EPs."""
    import numpy as np
    import torch

    from cervspine.config import composed
    from cervspine.models.backbones import create_backbone

    with composed("train", spec["overrides"], WORK / "compose") as cfg:
        chans = int(cfg.model.in_chans)
    size, batch = spec["input_size"], 32
    net = create_backbone(spec["backbone"], in_chans=chans).cuda().eval()
    x = torch.rand(batch, chans, size, size, device="cuda")
    out: dict[str, Any] = {"batch": batch, "in_chans": chans, "input_size": size}
    with torch.inference_mode():
        ref = net(x).float()
        net_cl = net.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)

        def torch_bf16() -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return net_cl(xc)

        out["torch_bf16"] = _rate(torch_bf16, batch)
        out["torch_bf16"]["max_abs_diff"] = float((torch_bf16().float() - ref).abs().max())
    try:
        import onnxruntime as ort
    except ImportError:
        out["onnxruntime"] = "not installed"
        return out
    path = WORK / "onnx" / f"{recipe}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net.float().to(memory_format=torch.contiguous_format),
        x[:1],
        str(path),
        input_names=["x"],
        output_names=["f"],
        dynamic_axes={"x": {0: "b"}},
        dynamo=False,
    )
    feeds = {"x": x.cpu().numpy()}
    for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if provider not in ort.get_available_providers():
            out[provider] = "not available"
            continue
        if provider.startswith("Tensorrt") and time_left() < TENSORRT_MIN_S:  # engine builds take minutes
            out[provider] = f"skipped: under {TENSORRT_MIN_S} s left for its engine build"
            continue
        opts = {"trt_fp16_enable": True} if provider.startswith("Tensorrt") else {}
        try:
            sess = ort.InferenceSession(str(path), providers=[(provider, opts)])
            got = sess.run(None, feeds)[0]
            out[provider] = _rate(lambda s=sess: s.run(None, feeds), batch)
            out[provider]["max_abs_diff"] = float(np.abs(got - ref.cpu().numpy()).max())
        except Exception as e:  # noqa: BLE001  (an EP that fails is a finding, not a crash)
            out[provider] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return out


def _rate(fn, batch: int, warmup: int = 3, iters: int = 10) -> dict[str, float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return {"images_per_s": batch * iters / (time.perf_counter() - t0)}


def markdown(result: dict) -> str:
    lines = [
        f"# GPU check ({result['device']})",
        "",
        f"`make gpu-check`, {result['when']}; "
        f"{result['seconds'] / 60:.1f} min of a {result['minutes']:g}-minute deadline. Random init, "
        "synthetic "
        "inputs at the recipes' real sizes: compute and memory, not accuracy.",
        "",
        "## Training (the recipes' batch sizes and workers, bf16-mixed)",
        "",
        "| recipe | backbone @ input, batch | samples/s | steps that waited on the loader | peak GPU GiB | "
        "peak host GiB | one fold at this rate | budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe, r in result["train"].items():
        s = result["plan"][recipe]
        if not isinstance(r, dict) or "train_samples_per_s" not in r:
            lines.append(
                f"| {recipe} | {s['backbone']} @ {s['input_size']}², {s['batch_size']} | "
                f"{r if isinstance(r, str) else 'failed: ' + str(r.get('error', ''))[-200:]} | | | | | |"
            )
            continue
        hours = r.get("fold_hours_at_this_rate")
        lines.append(
            f"| {recipe} | {s['backbone']} @ {s['input_size']}², {s['batch_size']} | "
            f"{r['train_samples_per_s']:.1f} "
            f"| {100 * (r.get('waited_fraction') or 0):.0f}% | {r.get('peak_gpu_gib', float('nan')):.1f} | "
            f"{r.get('peak_rss_gib', float('nan')):.1f} | {'–' if hours is None else f'{hours:.2f} h'} | "
            f"{r.get('budget_h', '–')} h |"
        )
    lines += [
        "",
        "## Inference (one backbone forward, batch 32)",
        "",
        "| recipe | torch bf16 img/s | TensorRT fp16 img/s | ORT CUDA img/s | max abs diff vs fp32 "
        "(torch/TRT/CUDA) |",
        "|---|---|---|---|---|",
    ]
    for recipe, r in result["inference"].items():
        if not isinstance(r, dict):
            lines.append(f"| {recipe} | {r} | | | |")
            continue

        def cell(key: str, field: str = "images_per_s", r: dict = r) -> str:
            v = r.get(key)
            return f"{v[field]:.4g}" if isinstance(v, dict) else str(v or "–")

        diffs = "/".join(
            cell(k, "max_abs_diff")
            for k in ("torch_bf16", "TensorrtExecutionProvider", "CUDAExecutionProvider")
        )
        lines.append(
            f"| {recipe} | {cell('torch_bf16')} | {cell('TensorrtExecutionProvider')} | "
            f"{cell('CUDAExecutionProvider')} | {diffs} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="compose and stop (no GPU needed)")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    args = ap.parse_args(argv)
    import torch

    t0 = time.perf_counter()
    recipes = [r for r in args.recipes.split(",") if r]
    steps = plan(recipes, WORK / "rsna")
    print(
        f"gpu-check: {len(steps)} recipes composed: "
        + "; ".join(
            f"{r} ({s['backbone']} @ {s['input_size']}², batch {s['batch_size']}, "
            f"{s['num_workers']} workers, "
            f"{s['trainer']['precision']})"
            for r, s in steps.items()
        ),
        flush=True,
    )
    if not torch.cuda.is_available():
        print(
            f"gpu-check: no GPU (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            "torch.cuda.is_available() is False): nothing measured, nothing written",
            flush=True,
        )
        return 0 if args.dry_run else 2
    if args.dry_run:
        print("gpu-check: dry run: composed, stopping", flush=True)
        return 0
    deadline = t0 + 60 * args.minutes
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": args.minutes,
        "plan": steps,
        "train": {},
        "inference": {},
    }
    root = make_data()
    for recipe, spec in steps.items():
        if left() < ESTIMATED_S["train"]:
            result["train"][recipe] = "skipped: no time left"
            continue
        try:
            result["train"][recipe] = train_part(recipe, spec, root, timeout_s=max(30.0, left() - 30))
        except subprocess.TimeoutExpired:
            result["train"][recipe] = "timed out at the deadline"
    for recipe, spec in steps.items():
        if left() < ESTIMATED_S["inference"]:
            result["inference"][recipe] = "skipped: no time left"
            continue
        try:
            result["inference"][recipe] = inference_part(recipe, spec, left)
        except Exception as e:  # noqa: BLE001
            result["inference"][recipe] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result))
    print((args.out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
