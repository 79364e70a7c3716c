"""GPU training throughput of the real-data recipes (fracture_b5, vertebrae_b5): images/s.

bf16 autocast, channels_last, torch.compile off and on; the LightningModules' own forward + loss, AdamW.
Needs only torch, timm, lightning, torchmetrics (runs on a bare GPU image):
    PYTHONPATH=. python experiments/benchmarks/gpu_throughput.py --out results.json
Random inputs (throughput does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch

from cervspine.data.metadata import NUM_FEATURES
from cervspine.models.fracture import FractureClassifier
from cervspine.models.vertebrae import VertebraeDetector

RECIPES = {  # as in conf/experiment/*_b5.yaml: input 384², 2.5D channels, batch 16
    "fracture_b5": dict(cls=FractureClassifier, in_chans=5, size=384, batch=16),
    "vertebrae_b5": dict(cls=VertebraeDetector, in_chans=6, size=384, batch=16),
}


def build(name: str, compile_: bool) -> torch.nn.Module:
    r = RECIPES[name]
    kw = dict(
        backbone={"name": "tf_efficientnet_b5", "drop_path_rate": 0.2},
        in_chans=r["in_chans"],
        optimizer=partial(torch.optim.AdamW, lr=3e-4),
        channels_last=True,
        compile=compile_,
    )
    if r["cls"] is FractureClassifier:
        kw.update(num_meta=NUM_FEATURES, fusion="gate")
    return r["cls"](**kw).cuda()


def batch(name: str) -> dict[str, torch.Tensor]:
    r = RECIPES[name]
    b, s = r["batch"], r["size"]
    out = {
        "image": torch.rand(b, r["in_chans"], s, s, device="cuda"),
        "target": (torch.rand(b, 7, device="cuda") > 0.8).float(),
    }
    if name.startswith("fracture"):
        out.update(meta=torch.randn(b, NUM_FEATURES, device="cuda"), weight=torch.ones(b, 7, device="cuda"))
    else:
        out.update(box=torch.rand(b, 4, device="cuda"), box_mask=torch.ones(b, device="cuda"))
    return out


def loss_of(model, name, x):
    if name.startswith("fracture"):
        return model._loss(x, model(x["image"], x["meta"]))
    return model._loss(x)[0]


def train_rate(name: str, compile_: bool, warmup: int, steps: int) -> dict:
    model = build(name, compile_)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x = batch(name)

    def run(n: int) -> tuple[float, torch.Tensor]:
        """n optimizer steps; (seconds, last loss)."""
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_of(model, name, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, loss

    warm_s, _ = run(warmup)
    torch.cuda.reset_peak_memory_stats()
    dt, loss = run(steps)
    return {
        "recipe": name,
        "compile": compile_,
        "train_images_per_s": round(steps * x["image"].shape[0] / dt, 1),
        "warmup_s": round(warm_s, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


@torch.inference_mode()
def infer_rate(name: str, steps: int) -> float:
    model = build(name, False).eval()
    x = batch(name)
    x["image"] = torch.rand(64, *x["image"].shape[1:], device="cuda")
    if "meta" in x:
        x["meta"] = torch.randn(64, NUM_FEATURES, device="cuda")
    call = (lambda: model(x["image"], x["meta"])) if "meta" in x else (lambda: model(x["image"]))
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            call()
    torch.cuda.synchronize()
    return round(steps * 64 / (time.perf_counter() - t0), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_throughput.json")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in RECIPES:
        for compile_ in (False, True):
            row = train_rate(name, compile_, warmup=8 if compile_ else 4, steps=args.steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
        rows.append({"recipe": name, "inference_images_per_s_bf16": infer_rate(name, 10)})
        print(json.dumps(rows[-1]), flush=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
