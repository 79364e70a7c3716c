"""Issue #4's quality benchmark: the demo pipeline's models scored on held-out synthetic studies.

Synthesizes a held-out folder with the demo's generator settings and another seed (once), runs
``cervspine.evaluate`` on every study of it with the checkpoints of a finished ``make demo`` run, and
scores against the prior-only baseline: each target's prevalence in the demo's *training* folder as a
constant prediction. Writes JSON and prints a Markdown summary. SYNTHETIC data throughout.

    python -m experiments.demo_quality [--run outputs/pipeline/demo] [--train data/synthetic_demo_v2]
        [--holdout data/synthetic_demo_v2_holdout] [--n 60] [--out experiments/demo_quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cervspine import TARGETS
from cervspine.io.rsna import RsnaIndex
from cervspine.scoring.metrics import bootstrap_ci, classification_report, prior_baseline, rsna_score

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO, TARGET_AUROC = 0.5, 0.9  # issue #4: rsna_score ≤ 0.5 × prior, patient AUROC ≥ 0.9


def demo_synth_args() -> list[str]:
    """The Makefile's DEMO_SYNTH settings (one source of truth for the generator options)."""
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "print-demo-synth"], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"make print-demo-synth failed: {out.stderr}")
    return shlex.split(out.stdout.strip())


def synthesize_holdout(path: Path, n: int, seed: int) -> None:
    if (path / "synthetic_manifest.csv").is_file():
        return
    args = [a for a in demo_synth_args() if not a.startswith(("n_train=", "n_test=", "seed="))]
    cmd = [sys.executable, "-m", "cervspine.synthesize", f"out={path}", f"n_train={n}", "n_test=0"]
    subprocess.run([*cmd, f"seed={seed}", *args], cwd=ROOT, check=True)


def run_evaluate(run: Path, holdout: Path, out: Path) -> pd.DataFrame:
    cmd = [
        sys.executable,
        "-m",
        "cervspine.evaluate",
        f"data.root={holdout}",
        f"run_dir={run}",
        "fold=null",
        f"hydra.run.dir={out}",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return pd.read_csv(out / "predictions.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "outputs/pipeline/demo")
    ap.add_argument("--train", type=Path, default=ROOT / "data/synthetic_demo_v2")
    ap.add_argument("--holdout", type=Path, default=ROOT / "data/synthetic_demo_v2_holdout")
    ap.add_argument("--n", type=int, default=60, help="held-out studies to synthesize")
    ap.add_argument("--seed", type=int, default=1, help="generator seed of the held-out folder")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/demo_quality.json")
    args = ap.parse_args()

    synthesize_holdout(args.holdout, args.n, args.seed)
    t0 = time.perf_counter()
    table = run_evaluate(args.run, args.holdout, args.run / "holdout_evaluation")
    seconds = time.perf_counter() - t0
    y = table[[f"label_{t}" for t in TARGETS]].to_numpy(np.float64)
    p = table[list(TARGETS)].to_numpy(np.float64)
    prior = prior_baseline(RsnaIndex.from_root(args.train).labels[list(TARGETS)].to_numpy(np.float64))
    prior_score = rsna_score(y, np.tile(prior, (len(y), 1)))
    report = classification_report(y, p)
    lo, hi = bootstrap_ci(y, p, rsna_score, n=1000)
    result = {
        "data": "SYNTHETIC: these numbers say nothing about real CT",
        "run": str(args.run),
        "train_folder": str(args.train),
        "holdout_folder": str(args.holdout),
        "holdout_generator": {"seed": args.seed, "n_train": args.n, "settings": demo_synth_args()},
        "n_studies": len(y),
        "n_positive": int(y[:, -1].sum()),
        "rsna_score": report["rsna_score"],
        "rsna_score_ci95": [lo, hi],
        "prior_baseline_rsna_score": prior_score,
        "ratio_to_prior": report["rsna_score"] / prior_score,
        "patient_auroc": report["patient_overall"]["auroc"],
        "vertebra_auroc_macro": report["macro"]["auroc"],
        "per_vertebra_auroc": {t: report[t]["auroc"] for t in TARGETS[:7]},
        "target": {"ratio_to_prior_at_most": TARGET_RATIO, "patient_auroc_at_least": TARGET_AUROC},
        "met": bool(report["rsna_score"] <= TARGET_RATIO * prior_score)
        and bool(report["patient_overall"]["auroc"] >= TARGET_AUROC),
        "evaluate_seconds": seconds,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    per = ", ".join(f"{k} {v:.2f}" for k, v in result["per_vertebra_auroc"].items())
    print(
        f"SYNTHETIC held-out ({len(y)} studies, {result['n_positive']} positive): rsna_score "
        f"{result['rsna_score']:.3f} (95% CI {lo:.3f}–{hi:.3f}) vs prior {prior_score:.3f} → ratio "
        f"{result['ratio_to_prior']:.2f} (target ≤ {TARGET_RATIO}); patient AUROC "
        f"{result['patient_auroc']:.3f} (target ≥ {TARGET_AUROC}); vertebra AUROC macro "
        f"{result['vertebra_auroc_macro']:.3f} ({per}); target met: {result['met']}"
    )


if __name__ == "__main__":
    main()
