"""Stage 1 side by side: the whole-column model and the per-slice detector, each as stage 1 of the same
demo pipeline (same folder, same folds, stage 2 retrained on each one's stage-1 table), scored on the same
held-out folders of every generator variant by ``experiments.demo_quality``. SYNTHETIC data throughout.

    python -m experiments.demo_quality --run outputs/pipeline/demo \\
        --out experiments/demo_quality_variants.json
    python -m experiments.demo_quality --run outputs/pipeline/demo_slice_stage1 \\
        --out experiments/demo_quality_variants_slice_stage1.json
    python -m experiments.stage1_comparison NAME=JSON [NAME=JSON …] [--out experiments/stage1_comparison.md]

Each JSON's run folder also gives the stage-1 validation fold's per-level slice F1 at its best epoch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from cervspine import VERTEBRAE

ROOT = Path(__file__).resolve().parents[1]


def validation_f1(run: Path) -> dict[str, float] | None:
    """Per-level slice F1 of stage 1's validation fold at its best epoch (``val/f1_macro``), if logged."""
    files = sorted((run / "stage1").glob("csv/**/metrics.csv")) or sorted(
        (run / "stage1").glob("**/metrics.csv")
    )
    if not files:
        return None
    frame = pd.read_csv(files[-1])
    if "val/f1_macro" not in frame:
        return None
    rows = frame.dropna(subset=["val/f1_macro"])
    best = rows.loc[rows["val/f1_macro"].idxmax()]
    return {v: float(best[f"val/f1_{v}"]) for v in VERTEBRAE} | {"epoch": int(best["epoch"])}


def rows(name: str, result: dict[str, Any]) -> list[str]:
    out = []
    for variant, r in result["variants"].items():
        f1 = [r["stage1"]["per_level"][v]["f1"] for v in VERTEBRAE]
        ext = max(r["stage1"]["per_level"][v]["extent_error_median"] for v in VERTEBRAE)
        misses = sum(r["stage1"]["per_level"][v]["missed"] for v in VERTEBRAE)
        out.append(
            f"| {name} | {variant} | {' '.join(f'{x:.2f}' for x in f1)} | {min(f1):.2f} | {ext:.2f} "
            f"| {misses} "
            f"| {r['rsna_score']:.3f} | {r['prior_baseline_rsna_score']:.3f} | {r['ratio_to_prior']:.2f} "
            f"| {r['patient_auroc']:.3f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="NAME=path/to/demo_quality.json")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/stage1_comparison.md")
    args = ap.parse_args()

    lines = [
        "| stage 1 | held-out variant | slice F1 C1…C7 | F1 min | extent error, worst level's median "
        "| misses "
        "| rsna_score | prior | ratio | patient AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    val = ["| stage 1 | best epoch | validation-fold slice F1 C1…C7 |", "|---|---|---|"]
    for item in args.results:
        name, path = item.split("=", 1)
        result = json.loads(Path(path).read_text())
        lines += rows(name, result)
        f1 = validation_f1(Path(result["run"]))
        if f1:
            val.append(f"| {name} | {f1['epoch']} | {' '.join(f'{f1[v]:.2f}' for v in VERTEBRAE)} |")
    table = "\n".join(["SYNTHETIC data.", "", *val, "", *lines])
    args.out.with_suffix(".table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
