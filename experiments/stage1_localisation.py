"""Stage-1 localisation on held-out segmented studies: per level, how many slices the detector marks
(probability ≥ 0.5) that the segmentation says do not show the level, and the reverse.

A slice shows a level where the segmentation holds ≥ ``--presence`` of that level's largest slice area
(the stage-1 training target). Stage 2 takes its slice labels from these predictions in studies without
a segmentation, so precision here is what keeps thoracic slices out of C7's fracture labels
(experiments/demo_quality.md). SYNTHETIC data in the demo's folders.

    python -m experiments.stage1_localisation [--run outputs/pipeline/demo]
        [--holdout data/synthetic_demo_v2_holdout]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cervspine import VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.inference import Runtime, Stage1, load_stage1
from cervspine.runs.layout import STAGE_DIRS, best_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def localisation(stage1: Stage1, cache_dir: Path, presence: float) -> tuple[int, np.ndarray]:
    """(segmented studies scored, (3, 7) true-positive / false-positive / false-negative slice counts)."""
    counts = np.zeros((3, len(VERTEBRAE)), dtype=np.int64)
    n = 0
    for entry in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
        study = CachedStudy(entry)
        truth = study.vertebra_presence(presence, "fraction")
        if truth is None:
            continue
        truth = truth[:, : len(VERTEBRAE)] > 0
        pred = stage1.run(study).visibility >= 0.5
        counts += np.stack([(pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0)])
        n += 1
    return n, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "outputs/pipeline/demo")
    ap.add_argument("--holdout", type=Path, default=ROOT / "data/synthetic_demo_v2_holdout")
    ap.add_argument("--image-size", type=int, default=128, help="the cache the run was trained on")
    ap.add_argument("--presence", type=float, default=0.1)
    args = ap.parse_args()

    stage1 = load_stage1(best_checkpoint(args.run / STAGE_DIRS["stage1"]), Runtime.create("cpu"))
    cache_dir = args.holdout / ".cervspine_cache" / f"s{args.image_size}"
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"{cache_dir}: no cache (run make demo-quality, which preprocesses it)")
    n, (tp, fp, fn) = localisation(stage1, cache_dir, args.presence)
    if not n:
        raise RuntimeError(f"{cache_dir}: no study with a segmentation")
    print(f"SYNTHETIC held-out stage-1 localisation, {n} segmented studies of {args.holdout}")
    print("| level | slices marked and shown | marked, not shown | shown, not marked | precision | recall |")
    print("|---|---|---|---|---|---|")
    for i, v in enumerate(VERTEBRAE):
        prec, rec = tp[i] / max(tp[i] + fp[i], 1), tp[i] / max(tp[i] + fn[i], 1)
        print(f"| {v} | {tp[i]} | {fp[i]} | {fn[i]} | {prec:.2f} | {rec:.2f} |")


if __name__ == "__main__":
    main()
