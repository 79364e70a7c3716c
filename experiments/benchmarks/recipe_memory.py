"""Memory of the real-data recipes trained on a CPU: peak memory per stage, against the estimate
:class:`~cervspine.training.memory.MemoryGuard` makes before the first step.

Folder: ``python -m cervspine.synthesize out=… n_train=8 n_test=2 size=128`` (cached 512², as the recipes
ask). For each recipe (``vertebrae_column``, ``fracture_seq``, ``fracture_b5``, ``vertebrae_b5``):

* **the recipe as given** — ``python -m cervspine.train experiment=R trainer=cpu`` for four training steps
  and two validation batches (long enough for every loader worker to fill its queue; a fast_dev_run ends
  before most have built a sample), at the recipe's batch size and ``data.num_workers``: either the guard
  sizes the workers and the run fits, or it refuses before training, naming its estimate and the settings
  that fit (the goal: never an out-of-memory kill on a 24 GB machine);
* **a smaller batch that fits** (the same workers): measured peak against the estimate, the ratio the
  guard's constants are calibrated from.

Peak memory: the training process's own peak resident set (``wait4``'s ``ru_maxrss``, exact) and the
whole process tree's proportional set size (loader workers included, shared pages split between them;
sampled every 0.1 s). A run is killed when the tree passes ``--cap`` GiB (this machine is shared): a kill
is reported as such. Random init (``model.backbone.pretrained=false``: nothing is downloaded).

    python -m experiments.benchmarks.recipe_memory [--quick] [--cap 14]
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from experiments.benchmarks.common import BENCH_DATA, ROOT, Row, cli, command, finish

GIB = 2**30
GOAL_GIB = 24.0
# (recipe, the smaller run that fits: its overrides)
RECIPES = {
    # every column at max_positions: positions 0.5 mm apart, cut to 48 (the image count is fixed)
    "vertebrae_column": [
        "data.batch_size=1",
        "data.min_fraction=1.0",
        "data.z_step_mm=0.5",
        "data.max_positions=48",
    ],
    "fracture_seq": ["data.batch_size=1", "data.n_slices=6"],
    "fracture_b5": ["data.batch_size=4"],
    "vertebrae_b5": ["data.batch_size=4"],
}
# four training steps and two validation batches: long enough for the loader workers of both pools to
# fill their prefetch queues (a fast_dev_run ends before most workers have built a sample)
COMMON = ["trainer=cpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=4",
          "+trainer.limit_val_batches=2", "model.backbone.pretrained=false", "print_config=false",
          "data.preprocess_workers=2", "++trainer.enable_progress_bar=false", "logger=csv"]  # fmt: skip


def folder() -> Path:
    """The issue's small folder (8 + 2 studies, 128², half of them segmented), written once."""
    path = BENCH_DATA / "rsna_synth_8x128_n2"
    if not (path / "synthetic_manifest.csv").is_file():
        cmd = [sys.executable, "-m", "cervspine.synthesize", f"out={path}", "n_train=8", "n_test=2",
               "size=128", "workers=2", "overwrite=true"]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return path


def _tree_pss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


def run(overrides: list[str], out: Path, cap_gib: float) -> dict[str, Any]:
    """``python -m cervspine.train`` with ``overrides``: exit status, peaks, whether it was killed, the
    guard's estimate (its memory_estimate.json) and the refusal it printed."""
    cmd = [sys.executable, "-m", "cervspine.train", *overrides, f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    peak_tree, killed, usage = 0, False, None
    while True:  # reaped here (not by Popen), for the child's own rusage
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_tree = max(peak_tree, _tree_pss(proc.pid))
        if peak_tree > cap_gib * GIB and not killed:
            proc.kill()
            killed = True
        time.sleep(0.1)
    rc = proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    text = "".join(lines)
    est_path = out / "memory_estimate.json"
    estimate = json.loads(est_path.read_text()) if est_path.is_file() else None
    refusal = next((ln for ln in text.splitlines() if "this CPU run needs" in ln and "raise" not in ln), None)
    main_peak = usage.ru_maxrss * 1024
    return {"cmd": " ".join(["python", *cmd[1:]]), "rc": rc, "killed": killed,
            "seconds": time.perf_counter() - t0, "peak_tree_pss_gib": peak_tree / GIB,
            "peak_main_rss_gib": main_peak / GIB, "estimate": estimate, "refusal": refusal,
            "tail": text[-1500:] if rc and not refusal else ""}  # fmt: skip


def rows_for(recipe: str, root: Path, tmp: Path, cap: float, quick: bool) -> tuple[list[Row], dict]:
    base = [f"experiment={recipe}", f"data.root={root}", *COMMON]
    record = {}
    rows = []
    cmd = command("recipe_memory", quick)
    if not quick:
        as_given = run(base, tmp / f"{recipe}_recipe", cap)
        record["recipe"] = as_given
        est = as_given["estimate"] or {}
        parts = est.get("parts", {})
        if as_given["refusal"]:
            what = f"refused before training: {as_given['refusal'].split('needs about', 1)[-1].strip()}"
        elif as_given["killed"]:
            what = f"killed at the {cap:g} GiB cap of this benchmark"
        else:
            what = f"ran, {est.get('workers')} of {est.get('configured_workers')} workers (guard)"
        peak = as_given["peak_tree_pss_gib"]
        rows.append(
            Row(
                "recipe memory (CPU)",
                f"{recipe} trainer=cpu at the recipe's batch "
                f"({parts.get('step_images', '?')} images a step) and workers: {what.split(':')[0]}; peak "
                "memory of the process tree (GiB)",
                peak,
                "GiB",
                "guard's estimate",
                est.get("estimate_gib"),
                goal=f"fits {GOAL_GIB:g} GB or refused before training",
                met=(not as_given["killed"])
                and (as_given["rc"] == 0 or bool(as_given["refusal"]))
                and peak <= GOAL_GIB,
                command=cmd,
                lower_is_better=True,
                note=what,
            )  # fmt: skip
        )
    small = run([*base, *RECIPES[recipe]], tmp / f"{recipe}_small", cap)
    record["small"] = small
    est = small["estimate"] or {}
    parts = est.get("parts", {})
    main = small["peak_main_rss_gib"]
    main_est = None
    if parts:
        main_est = (parts["process"] + parts["optimizer"] + parts["activations"] + parts["inputs"]) / GIB
    rows.append(
        Row(
            "recipe memory (CPU)",
            f"{recipe} trainer=cpu {' '.join(RECIPES[recipe])} "
            f"({parts.get('step_images', '?')} images a step, {est.get('workers')} workers): peak of the "
            "training process (GiB)",
            main or 0.0,
            "GiB",
            "guard's estimate of it",
            main_est,
            goal="estimate ≥ measured (a guard errs on the safe side)",
            met=None if main is None or main_est is None else main_est >= main,
            command=cmd,
            lower_is_better=True,
            note=f"exit {small['rc']}{' (killed)' if small['killed'] else ''}; process tree "
            f"{small['peak_tree_pss_gib']:.2f} GiB PSS against {est.get('estimate_gib', float('nan')):.2f} "
            f"estimated with its workers; {small['seconds']:.0f} s",
        )  # fmt: skip
    )
    return rows, record


def main() -> None:
    import tempfile

    args = cli(__doc__.splitlines()[0])
    cap = float(os.environ.get("CERVSPINE_BENCH_MEMORY_CAP_GIB", 14))
    root = folder()
    rows: list[Row] = []
    records = {}
    recipes = ["fracture_b5", "vertebrae_column"] if args.quick else list(RECIPES)
    with tempfile.TemporaryDirectory(prefix="recipe-mem-") as tmp:
        for recipe in recipes:
            got, records[recipe] = rows_for(recipe, root, Path(tmp), cap, args.quick)
            rows += got
            shown = {k: {kk: vv for kk, vv in v.items() if kk != "tail"} for k, v in records[recipe].items()}
            print(json.dumps({recipe: shown}, default=str), flush=True)
    finish(rows, args.json, {"runs": records, "cap_gib": cap})


if __name__ == "__main__":
    main()
