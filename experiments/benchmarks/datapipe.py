"""Data pipeline: training samples/s of each DataModule per loader worker count, against the model's step.

The DataModules and models are built from the experiments' configs (Hydra compose, as
``cervspine.train`` does): ``vertebrae_demo`` and ``fracture_demo`` (augmentation on) on a small
synthetic folder (8 studies 256², cache 128²). For each: loader samples/s with 0, 1 and 2 workers
(steady state: after the first batch, across epoch ends) and the demo model's training step
(forward + backward + AdamW step on a real batch), interleaved, medians. The loader should not be the
bottleneck: ≥3× the model's samples/s with 2 workers.

GPU sizing: samples/s of one loader worker at the ``fracture_b5`` input (384² crops from a 512² cache,
bone window, context 2 stride 2, augmentation on) against the H100 training rate of fracture_b5
(experiments/benchmarks/gpu_h100.json) → how many loader workers such a GPU needs.

    python -m experiments.benchmarks.datapipe [--quick]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from experiments.benchmarks.common import (
    Row,
    cli,
    command,
    finish,
    hydra_config,
    median,
    rsna_folder,
)

GPU_JSON = Path(__file__).with_name("gpu_h100.json")
DEMOS = {"vertebrae_demo": "VertebraeDataModule", "fracture_demo": "FractureDataModule"}
# slice_step=1: more slices per epoch on the small folder (the per-sample work is the same)
EXTRA = {"vertebrae_demo": ["data.slice_step=1"], "fracture_demo": []}


def compose(experiment: str, root: Path, overrides: list[str]):
    from hydra.utils import instantiate

    with hydra_config(
        "train", [f"experiment={experiment}", f"data.root={root}", "data.n_folds=4", *overrides], Path("/tmp")
    ) as cfg:
        return instantiate(cfg.data), cfg.model


def batches(loader) -> Iterator[dict]:
    """Batches forever, across epoch ends (persistent workers carry over)."""
    while True:
        yield from loader


def loader_rate(it: Iterator[dict], n: int, workers: int) -> float:
    """Samples/s over ``n`` batches of a started iterator, after taking the batches its workers prepared
    while idle (``prefetch_factor`` = 2 per worker), which would otherwise count as free."""
    for _ in range(2 * workers):
        next(it)
    t0 = time.perf_counter()
    count = sum(len(next(it)["image"]) for _ in range(n))
    return count / (time.perf_counter() - t0)


def step_rate(model, batch: dict, steps: int) -> float:
    """Samples/s of forward + backward + optimizer step of ``model`` on ``batch``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        if "meta" in batch:
            loss = model._loss(batch, model(batch["image"], batch["meta"]))
        else:
            loss = model._loss(batch)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(batch["image"]) / (time.perf_counter() - t0)


def demo_rows(experiment: str, root: Path, rounds: int, n_batches: int, steps: int, quick: bool) -> list[Row]:
    from hydra.utils import instantiate

    iters, loaders, model = {}, {}, None
    for k in (0, 1, 2):
        dm, model_cfg = compose(experiment, root, [f"data.num_workers={k}", *EXTRA[experiment]])
        dm.prepare_data()
        dm.setup("fit")
        loaders[k] = dm.train_dataloader()
        iters[k] = batches(loaders[k])
        next(iters[k])  # workers start, first batch
        if model is None:
            model = instantiate(model_cfg)
            batch = next(iters[0])
    rates: dict[str, list[float]] = {"model": [], 0: [], 1: [], 2: []}
    for r in range(rounds):
        order = ["model", 0, 1, 2] if r % 2 == 0 else [2, 1, 0, "model"]
        for k in order:
            if k == "model":
                rates["model"].append(step_rate(model, batch, steps))
            else:
                rates[k].append(loader_rate(iters[k], n_batches, k))
    del iters, loaders
    med = {k: median(v) for k, v in rates.items()}
    bs, size = len(batch["image"]), tuple(batch["image"].shape[1:])
    cmd = command("datapipe", quick)
    rows = [
        Row(
            "datapipe",
            f"{DEMOS[experiment]} ({experiment}, input {size[1]}², {size[0]} ch, augmentation on), "
            f"{k} worker{'s' if k != 1 else ''} (samples/s)",
            med[k],
            "samples/s",
            f"{experiment} model train step (batch {bs})",
            med["model"],
            goal="≥3× the model's samples/s" if k == 2 else "—",
            met=med[k] >= 3 * med["model"] if k == 2 else None,
            command=cmd,
            note=f"{rounds} interleaved rounds ({n_batches} batches / {steps} steps each), medians; "
            f"model {med['model']:.1f} samples/s"
            + (f"; {', '.join(EXTRA[experiment])}" if EXTRA[experiment] else ""),
        )
        for k in (0, 1, 2)
    ]
    return rows


def b5_rows(rounds: int, n_batches: int, quick: bool) -> list[Row]:
    root = rsna_folder(3, 512, (250, 300), uncompressed=True)
    gpu = json.loads(GPU_JSON.read_text())
    train = {
        r["compile"]: r["train_images_per_s"]
        for r in gpu["rows"]
        if r.get("recipe") == "fracture_b5" and "compile" in r
    }
    iters, loaders, shape = {}, {}, None
    for k in (1, 2):
        dm, _ = compose("fracture_b5", root, [f"data.num_workers={k}"])
        dm.prepare_data()  # the 512² cache, built once
        ds = dm.dataset(dm.usable(sorted(dm.index.train_uids)), train=True)
        loaders[k] = dm._loader(ds, train=True, sampler=dm._sampler(ds))
        iters[k] = batches(loaders[k])
        shape = tuple(next(iters[k])["image"].shape)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(rounds):
        for k in (1, 2) if r % 2 == 0 else (2, 1):
            rates[k].append(loader_rate(iters[k], n_batches, k))
    del iters, loaders
    one, two = median(rates[1]), median(rates[2])
    gpu_rate = max(train.values())
    need = {c: math.ceil(v / one) for c, v in train.items()}
    return [
        Row(
            "datapipe",
            f"fracture_b5 loader, 1 worker ({shape[2]}² crops from a 512² cache, {shape[1]} ch, "
            f"augmentation; samples/s) → an H100 needs {need[True]} workers (compile on), "
            f"{need[False]} (compile off)",
            one,
            "samples/s",
            "H100 fracture_b5 train rate (bf16, channels_last, compile; gpu_h100.json)",
            gpu_rate,
            goal="workers needed ≤ fracture_b5.yaml num_workers (8)",
            met=max(need.values()) <= 8,
            command=command("datapipe", quick),
            note=f"one worker's rate measured on this CPU (shared cores: a GPU host's cores are usually "
            f"faster); 2 workers here: {two:.1f} samples/s ({two / one:.2f}× one). H100 rates measured "
            f"by the lead: {train[False]} img/s compile off, {train[True]} compile on; {rounds} "
            f"interleaved rounds of {n_batches} batches of {shape[0]}",
        )
    ]


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    torch.manual_seed(0)
    rounds = 2 if args.quick else 3
    root = rsna_folder(8, 256, (100, 140))
    rows: list[Row] = []
    for experiment in DEMOS:
        rows += demo_rows(
            experiment, root, rounds, n_batches=10 if args.quick else 25, steps=2, quick=args.quick
        )
    rows += b5_rows(rounds, n_batches=4 if args.quick else 10, quick=args.quick)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
