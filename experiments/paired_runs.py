"""Two pipeline runs scored on the same held-out studies: per variant and pooled, rsna_score of each and the
paired bootstrap interval of their difference (SYNTHETIC held-out folders of ``experiments.demo_quality``).
Reads ``<run>/holdout_<folder>/predictions.csv`` that ``make demo-quality`` (or ``--run RUN``) wrote.

    python -m experiments.paired_runs outputs/pipeline/demo_a outputs/pipeline/demo_b \\
        [--prefix synthetic_demo_v5_holdout_] [--variants default hard …] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cervspine import TARGETS
from cervspine.scoring.metrics import paired_bootstrap_difference, rsna_score
from cervspine.synthetic import VARIANTS

KEY = "StudyInstanceUID"


def held_out(run: Path, prefix: str, variant: str) -> pd.DataFrame:
    path = run / f"holdout_{prefix}{variant}" / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no held-out predictions (run experiments.demo_quality --run {run})")
    return pd.read_csv(path).sort_values(KEY).reset_index(drop=True)


def compare(a: pd.DataFrame, b: pd.DataFrame, n: int = 2000) -> dict[str, Any]:
    """Scores of both runs on the same studies (else ValueError), the paired b − a and its 95 % CI."""
    if list(a[KEY]) != list(b[KEY]):
        raise ValueError("the two runs scored different studies")
    y = a[[f"label_{t}" for t in TARGETS]].to_numpy(np.float64)
    pa, pb = a[list(TARGETS)].to_numpy(np.float64), b[list(TARGETS)].to_numpy(np.float64)
    diff, low, high = paired_bootstrap_difference(y, pa, pb, n=n)
    return {"n_studies": len(y), "a": rsna_score(y, pa), "b": rsna_score(y, pb), "diff_b_minus_a": diff,
            "diff_ci95": [low, high]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--prefix", default="synthetic_demo_v5_holdout_")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    pairs = {
        v: (held_out(args.run_a, args.prefix, v), held_out(args.run_b, args.prefix, v)) for v in args.variants
    }
    result: dict[str, Any] = {"synthetic": True, "run_a": str(args.run_a), "run_b": str(args.run_b)}
    result["variants"] = {v: compare(a, b) for v, (a, b) in pairs.items()}
    pooled = [pd.concat([p[i] for p in pairs.values()], ignore_index=True) for i in (0, 1)]
    result["pooled"] = compare(*pooled)  # variant by variant, each sorted: the rows stay paired
    for name, r in {**result["variants"], "pooled": result["pooled"]}.items():
        lo, hi = r["diff_ci95"]
        print(f"{name:10s} n={r['n_studies']:3d} a={r['a']:.4f} b={r['b']:.4f} "
              f"b-a={r['diff_b_minus_a']:+.4f} (95% CI {lo:+.4f}..{hi:+.4f})  SYNTHETIC")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
