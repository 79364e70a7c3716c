"""The demo's quality benchmark: the demo pipeline's models scored on held-out synthetic folders, one per
generator variant, never used for training or tuning.

For every variant (``cervspine.synthesize variant=…``: default, uniform, coverage, fov, thickness,
subtle, hard) a held-out folder is synthesized once with the demo's generator settings, another seed and
that variant; the run's checkpoints score every study through ``cervspine.evaluate`` and stage 1 is
scored on the segmented ones (per-level slice F1 and extent error, ``experiments.stage1_localisation``).
The baseline is the prior: each target's prevalence in the demo's *training* folder, predicted for every
study. Targets (issue 15): rsna_score ≤ 0.5 × the prior's, patient AUROC ≥ 0.9; stage-1 F1 ≥ 0.9 and
extent error ≤ ½ a vertebra at every level. Writes JSON and a Markdown table. SYNTHETIC data throughout.

    python -m experiments.demo_quality [--run outputs/pipeline/demo] [--train data/synthetic_demo_v5]
        [--variants default hard …] [--n 40] [--out experiments/demo_quality_variants.json]
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
from typing import Any

import numpy as np
import pandas as pd

from cervspine import TARGETS
from cervspine.inference import Runtime, load_stage1
from cervspine.io.rsna import RsnaIndex
from cervspine.runs.layout import STAGE_DIRS, best_checkpoint
from cervspine.scoring.metrics import bootstrap_ci, classification_report, prior_baseline, rsna_score
from cervspine.synthetic import VARIANTS as GENERATOR_VARIANTS
from experiments.stage1_localisation import cached, localisation

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = tuple(GENERATOR_VARIANTS)  # default, uniform, coverage, fov, thickness, subtle, neck, hard
TARGET_RATIO, TARGET_AUROC = 0.5, 0.9
HOLDOUT_SEED = 101


def demo_synth_args() -> list[str]:
    """The Makefile's DEMO_SYNTH settings (one source of truth for the generator options)."""
    out = subprocess.run(
        ["make", "-s", "--no-print-directory", "print-demo-synth"], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"make print-demo-synth failed: {out.stderr}")
    return shlex.split(out.stdout.strip())


def synthesize_holdout(path: Path, n: int, variant: str) -> list[str]:
    """The held-out folder of ``variant`` (written once); returns the generator settings used."""
    drop = ("n_train=", "n_test=", "seed=", "variant=", "seg_fraction=", "workers=")
    args = [a for a in demo_synth_args() if not a.startswith(drop)]
    args += [f"n_train={n}", "n_test=0", f"seed={HOLDOUT_SEED}", "seg_fraction=0.5", f"variant={variant}"]
    if not (path / "synthetic_manifest.csv").is_file():
        cmd = [sys.executable, "-m", "cervspine.synthesize", f"out={path}", "workers=2", *args]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return args


def run_evaluate(run: Path, holdout: Path, out: Path) -> pd.DataFrame:
    cmd = [sys.executable, "-m", "cervspine.evaluate", f"data.root={holdout}", f"run_dir={run}"]
    cmd += ["fold=null", f"hydra.run.dir={out}"]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return pd.read_csv(out / "predictions.csv")


def score_variant(run: Path, holdout: Path, prior: np.ndarray, stage1, image_size: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    table = run_evaluate(run, holdout, run / f"holdout_{holdout.name}")
    y = table[[f"label_{t}" for t in TARGETS]].to_numpy(np.float64)
    p = table[list(TARGETS)].to_numpy(np.float64)
    prior_score = rsna_score(y, np.tile(prior, (len(y), 1)))
    report = classification_report(y, p)
    lo, hi = bootstrap_ci(y, p, rsna_score, n=1000)
    loc = localisation(stage1, cached(holdout, image_size))
    return {
        "holdout_folder": str(holdout),
        "n_studies": len(y),
        "n_positive": int(y[:, -1].sum()),
        "rsna_score": report["rsna_score"],
        "rsna_score_ci95": [lo, hi],
        "prior_baseline_rsna_score": prior_score,
        "ratio_to_prior": report["rsna_score"] / prior_score,
        "patient_auroc": report["patient_overall"]["auroc"],
        "vertebra_auroc_macro": report["macro"]["auroc"],
        "per_vertebra_auroc": {t: report[t]["auroc"] for t in TARGETS[:7]},
        "met": bool(report["rsna_score"] <= TARGET_RATIO * prior_score)
        and bool(report["patient_overall"]["auroc"] >= TARGET_AUROC),
        "stage1": loc,
        "seconds": time.perf_counter() - t0,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"SYNTHETIC held-out folders, run `{result['run']}` (trained on `{result['train_folder']}`), "
        f"stage 1 = {result['stage1_kind']}:",
        "",
        "| variant | studies (positive) | rsna_score (95% CI) | prior | ratio | patient AUROC "
        "| vertebra AUROC | stage-1 F1 min (level) | extent error max median | demo target met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in result["variants"].items():
        f1 = {lv: x["f1"] for lv, x in r["stage1"]["per_level"].items()}
        worst = min(f1, key=f1.get)
        ext = max(x["extent_error_median"] for x in r["stage1"]["per_level"].values())
        lo, hi = r["rsna_score_ci95"]
        lines.append(
            f"| {v} | {r['n_studies']} ({r['n_positive']}) | {r['rsna_score']:.3f} ({lo:.3f}–{hi:.3f}) | "
            f"{r['prior_baseline_rsna_score']:.3f} | {r['ratio_to_prior']:.2f} | {r['patient_auroc']:.3f} | "
            f"{r['vertebra_auroc_macro']:.3f} | {f1[worst]:.2f} ({worst}) | {ext:.2f} | {r['met']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "outputs/pipeline/demo")
    ap.add_argument("--train", type=Path, default=ROOT / "data/synthetic_demo_v5")
    ap.add_argument("--holdout-prefix", type=Path, default=None, help="default: <train>_holdout_")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--n", type=int, default=40, help="held-out studies per variant")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/demo_quality_variants.json")
    args = ap.parse_args()

    prefix = str(args.holdout_prefix or f"{args.train}_holdout_")
    prior = prior_baseline(RsnaIndex.from_root(args.train).labels[list(TARGETS)].to_numpy(np.float64))
    stage1 = load_stage1(best_checkpoint(args.run / STAGE_DIRS["stage1"]), Runtime.create("cpu"))
    result: dict[str, Any] = {
        "data": "SYNTHETIC: these numbers say nothing about real CT",
        "run": str(args.run),
        "train_folder": str(args.train),
        "stage1_kind": stage1.kind,
        "target": {"ratio_to_prior_at_most": TARGET_RATIO, "patient_auroc_at_least": TARGET_AUROC},
        "variants": {},
    }
    for variant in args.variants:
        holdout = Path(f"{prefix}{variant}")
        settings = synthesize_holdout(holdout, args.n, variant)
        result["variants"][variant] = {
            "generator": settings,
            **score_variant(args.run, holdout, prior, stage1, args.image_size),
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each variant: nothing lost
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
