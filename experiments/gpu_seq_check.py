"""GPU check of the real-data sequence recipe (conf/experiment/fracture_seq.yaml) at its real input sizes.

Random tensors stand in for crops (the check is about the model on the GPU: bf16-mixed training with a
BiGRU, channels_last, memory per batch and step time; and inference of one study). No Hydra, no DICOM:

    python -m experiments.gpu_seq_check [--batch 2] [--slices 15] [--size 384] [--steps 12]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cervspine.models.sequence import VertebraSequenceClassifier


class RandomStudies(Dataset):
    """Study items shaped like VertebraSequenceDataset's (7 sequences of N crops, C channels)."""

    def __init__(self, n: int, slices: int, chans: int, size: int):
        self.n, self.shape = n, (7, slices, chans, size, size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        target = (torch.rand(7, generator=g) < 0.15).float()
        return {
            "image": torch.rand(self.shape, generator=g),
            "present": torch.ones(7),
            "vertebra": torch.arange(7),
            "target": target,
            "overall_target": target.max(),
            "study_idx": i,
        }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else float("nan")


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync()
        self.times.append(time.perf_counter() - self._t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="tf_efficientnetv2_s")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--slices", type=int, default=15)
    ap.add_argument("--chans", type=int, default=6)  # context 2 (5 slices) × bone + mask
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rnn", default="gru")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = VertebraSequenceClassifier(
        {"name": args.backbone, "drop_path_rate": 0.2},
        in_chans=args.chans,
        optimizer=functools.partial(torch.optim.AdamW, lr=2e-4, weight_decay=1e-2),
        scheduler={"warmup_epochs": 1, "cycles": 1},
        rnn=args.rnn,
        rnn_hidden=256,
        channels_last=True,
    )
    data = DataLoader(
        RandomStudies(args.batch * args.steps, args.slices, args.chans, args.size),
        batch_size=args.batch,
        num_workers=4,
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=dev,
        devices=1,
        precision="bf16-mixed" if dev == "cuda" else "32-true",
        max_epochs=1,
        accumulate_grad_batches=4,
        gradient_clip_val=5.0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[timer],
    )
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, data)
    train_peak = _peak_gib()
    steady = timer.times[2:] or timer.times
    model = model.to(dev).eval()
    x = torch.rand(7, args.slices, args.chans, args.size, args.size, device=dev)
    present = torch.ones(7, device=dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(5):
        _sync()
        t = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            probs = model.predict_study(x, present)
        _sync()
        times.append(time.perf_counter() - t)
    report = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "args": vars(args),
        "train_steps": len(timer.times),
        "train_loss": float(trainer.callback_metrics["train/loss"]),
        "train_batch_s_median": sorted(steady)[len(steady) // 2],
        "crops_per_s": args.batch * 7 * args.slices / (sorted(steady)[len(steady) // 2]),
        "train_peak_gib": train_peak,
        "infer_study_s_median": sorted(times)[2],
        "infer_peak_gib": _peak_gib(),
        "probs": [round(float(p), 4) for p in probs],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
