"""Training throughput: samples/s of both demo models on this CPU, through the real DataModule + Trainer.

``python -m cervspine.train experiment=<demo> …`` runs for a fixed number of optimizer steps with a
timing callback (:class:`StepTimer`); samples/s over the steps after the first few (start-up and the
first epoch's loader start excluded). Baseline: the bare model's training step (forward + backward +
AdamW step on the first batch, again and again: no loader, no Trainer), timed in the same process just
before the first and just after the last Trainer step. The H100 figures of the real-data recipes
(bf16-mixed, channels_last, torch.compile off and on) come from experiments/benchmarks/gpu_h100.json,
measured by the lead with experiments/benchmarks/gpu_throughput.py; they are reported, not rerun.

    python -m experiments.benchmarks.training [--quick]
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from experiments.benchmarks.common import ROOT, Row, cli, command, finish, median, rsna_folder

GPU_JSON = Path(__file__).with_name("gpu_h100.json")
GPU_COMMAND = "PYTHONPATH=. python experiments/benchmarks/gpu_throughput.py --out results.json"
DEMOS = ("vertebrae_demo", "fracture_demo")
SKIP = 3  # steps not counted (start-up, first batches)


class StepTimer(L.Callback):
    """Records the end time and batch size of every training step, and the bare step rate (samples/s)
    on the first batch before the first step and after the last; writes them to ``out`` (JSON)."""

    def __init__(self, out: str, bare_steps: int = 3):
        self.out, self.bare_steps = out, int(bare_steps)
        self.ends, self.sizes, self.bare, self.batch = [], [], [], None

    def _bare(self, pl_module) -> None:
        from experiments.benchmarks.datapipe import step_rate

        with torch.enable_grad():
            self.bare.append(step_rate(pl_module, self.batch, self.bare_steps))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            self._bare(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.sizes.append(len(batch["image"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self._bare(pl_module)
        Path(self.out).write_text(json.dumps({"ends": self.ends, "sizes": self.sizes, "bare": self.bare}))


def train_command(experiment: str, root: Path, steps: int, run_dir: Path, timer_out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cervspine.train",
        f"experiment={experiment}",
        f"data.root={root}",
        "data.n_folds=4",
        f"+trainer.max_steps={steps}",
        "+trainer.limit_val_batches=1",
        "+trainer.enable_progress_bar=false",
        "print_config=false",
        "+callbacks.bench_timer._target_=experiments.benchmarks.training.StepTimer",
        f"+callbacks.bench_timer.out={timer_out}",
        f"hydra.run.dir={run_dir}",
    ]


def trainer_rate(experiment: str, root: Path, steps: int, tmp: Path) -> tuple[float, list[float], str]:
    out = tmp / f"{experiment}_timer.json"
    cmd = train_command(experiment, root, steps, tmp / experiment, out)
    env = {"WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    import os

    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True, text=True)
    rec = json.loads(out.read_text())
    ends, sizes = rec["ends"], rec["sizes"]
    rate = sum(sizes[SKIP + 1 :]) / (ends[-1] - ends[SKIP])
    shown = ["python", *cmd[1:]]
    shown = [a.replace(str(root), "<bench folder>").replace(str(tmp), "<tmp>") for a in shown]
    return rate, rec["bare"], shlex.join(shown)


def gpu_rows() -> list[Row]:
    gpu = json.loads(GPU_JSON.read_text())
    rows = []
    where = f"{gpu['device']}, torch {gpu['torch']}; measured by the lead, not rerun"
    for recipe in ("fracture_b5", "vertebrae_b5"):
        rs = [r for r in gpu["rows"] if r.get("recipe") == recipe]
        train = {r["compile"]: r for r in rs if "compile" in r}
        infer = next(r["inference_images_per_s_bf16"] for r in rs if "inference_images_per_s_bf16" in r)
        off, on = train[False], train[True]
        rows.append(
            Row(
                "training (H100)",
                f"{recipe} train images/s on H100, bf16-mixed, channels_last, torch.compile on "
                "(384², batch 16)",
                on["train_images_per_s"],
                "img/s",
                "torch.compile off (same script, same run)",
                off["train_images_per_s"],
                goal="—",
                command=f"{GPU_COMMAND} ({where})",
                note=f"compile warm-up {on['warmup_s']} s vs {off['warmup_s']} s; peak memory "
                f"{on['peak_mem_gib']} GiB vs {off['peak_mem_gib']} GiB; losses finite: "
                f"{on['loss_finite'] and off['loss_finite']}",
            )
        )
        rows.append(
            Row(
                "training (H100)",
                f"{recipe} inference images/s on H100, bf16 autocast (batch 64)",
                infer,
                "img/s",
                "H100 train rate, compile off",
                off["train_images_per_s"],
                goal="—",
                command=f"{GPU_COMMAND} ({where})",
            )
        )
    return rows


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    steps = 8 if args.quick else 11
    root = rsna_folder(8, 256, (100, 140))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for experiment in DEMOS:
            rate, (before, after), cmd = trainer_rate(experiment, root, steps, Path(tmp))
            bare = median([before, after])
            rows.append(
                Row(
                    "training (CPU)",
                    f"{experiment} training samples/s, DataModule + Trainer (steps {SKIP + 1}–{steps})",
                    rate,
                    "samples/s",
                    "bare model train step (no loader, no Trainer)",
                    bare,
                    goal="—",
                    command=cmd,
                    note=f"bare step (same process) before the first / after the last Trainer step: "
                    f"{before:.1f} / {after:.1f} samples/s; data.num_workers=2 loader processes share "
                    f"the 2 cores with the training threads; run as `{command('training', args.quick)}`",
                )
            )
    rows += gpu_rows()
    finish(rows, args.json)


if __name__ == "__main__":
    main()
