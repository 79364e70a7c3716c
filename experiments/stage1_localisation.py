"""Stage-1 localisation on held-out segmented studies: per level, slice precision / recall / F1 and the
extent error, for any stage-1 checkpoint (the per-slice detector or the whole-column model).

A slice shows a level where the segmentation holds ≥ ``presence`` of that level's largest slice area
(the stage-1 training target); stage 1 marks it where its probability is ≥ 0.5. The extent error of a
level in a study is max(|Δ first slice|, |Δ last slice|) in mm over the level's true height; a level the
segmentation shows and stage 1 never marks counts as an error of ∞ (a miss). Targets (issue 15): F1 ≥ 0.9
and extent error ≤ 0.5 at every level. SYNTHETIC data.

    python -m experiments.stage1_localisation --ckpt RUN/stage1/checkpoints/best.ckpt \\
        --holdout data/holdout_a [data/holdout_b …] [--image-size 128] [--out experiments/x.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.cache import CachedStudy, CacheParams, preprocess
from cervspine.inference import Runtime, Stage1, load_stage1
from cervspine.io.rsna import RsnaIndex

TARGET_F1, TARGET_EXTENT = 0.9, 0.5


def _extent(mask: np.ndarray) -> tuple[int, int] | None:
    hit = np.flatnonzero(mask)
    return (int(hit[0]), int(hit[-1])) if len(hit) else None


def study_errors(pred: np.ndarray, truth: np.ndarray, dz: float) -> np.ndarray:
    """(7,) extent error per level of one study (NaN where the segmentation does not show it)."""
    out = np.full(len(VERTEBRAE), np.nan)
    for v in range(len(VERTEBRAE)):
        t = _extent(truth[:, v])
        if t is None:
            continue
        p = _extent(pred[:, v])
        height = (t[1] - t[0] + 1) * dz
        out[v] = np.inf if p is None else max(abs(p[0] - t[0]), abs(p[1] - t[1])) * dz / height
    return out


def localisation(stage1: Stage1, cache_dir: Path, presence: float = 0.1) -> dict[str, Any]:
    """Counts and extent errors over every segmented study of ``cache_dir``."""
    counts = np.zeros((3, len(VERTEBRAE)), dtype=np.int64)  # tp, fp, fn slices
    errors = []
    for entry in sorted(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        study = CachedStudy(entry)
        truth = study.vertebra_presence(presence, "fraction")
        if truth is None:
            continue
        truth = truth > 0
        pred = stage1.run(study).visibility >= 0.5
        counts += np.stack([(pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0)])
        errors.append(study_errors(pred, truth, float(study.meta["spacing"][0])))
    tp, fp, fn = counts
    err = np.array(errors) if errors else np.zeros((0, len(VERTEBRAE)))
    per_level = {}
    for i, v in enumerate(VERTEBRAE):
        e = err[:, i][~np.isnan(err[:, i])]
        f1 = 2 * tp[i] / max(2 * tp[i] + fp[i] + fn[i], 1)
        per_level[v] = {
            "precision": float(tp[i] / max(tp[i] + fp[i], 1)),
            "recall": float(tp[i] / max(tp[i] + fn[i], 1)),
            "f1": float(f1),
            "extent_error_median": float(np.median(e)) if len(e) else float("nan"),
            "extent_within_half": float((e <= TARGET_EXTENT).mean()) if len(e) else float("nan"),
            "missed": int(np.isinf(e).sum()),
            "n_studies": int(len(e)),
        }
    met = all(r["f1"] >= TARGET_F1 and r["extent_error_median"] <= TARGET_EXTENT for r in per_level.values())
    return {"n_studies": len(errors), "per_level": per_level, "targets_met": bool(met)}


def cached(holdout: Path, image_size: int) -> Path:
    """The held-out folder's cache at ``image_size`` (built where missing)."""
    index = RsnaIndex.from_root(holdout)
    cache_dir = holdout / ".cervspine_cache" / f"s{image_size}"
    report = preprocess(index, cache_dir, CacheParams(image_size=image_size), workers=2, progress=False)
    if not report.ok:
        raise RuntimeError(f"{holdout}: preprocessing failed: {report.failed}")
    return cache_dir


def markdown(name: str, result: dict[str, Any]) -> str:
    rows = [f"**{name}** ({result['n_studies']} segmented studies; targets met: {result['targets_met']})", ""]
    rows += ["| level | precision | recall | F1 | extent error (median) | within ½ height | missed |"]
    rows += ["|---|---|---|---|---|---|---|"]
    for v, r in result["per_level"].items():
        rows.append(
            f"| {v} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | "
            f"{r['extent_error_median']:.2f} | {r['extent_within_half']:.2f} | {r['missed']} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True, help="a stage-1 checkpoint")
    ap.add_argument("--holdout", type=Path, nargs="+", required=True)
    ap.add_argument("--image-size", type=int, default=128, help="the cache the checkpoint was trained on")
    ap.add_argument("--presence", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    stage1 = load_stage1(args.ckpt, Runtime.create("cpu"))
    results = {}
    for holdout in args.holdout:
        results[holdout.name] = localisation(stage1, cached(holdout, args.image_size), args.presence)
        print(
            markdown(
                f"SYNTHETIC {holdout.name}, stage 1 = {stage1.kind} ({args.ckpt})", results[holdout.name]
            )
        )
        print()
    if args.out:
        args.out.write_text(
            json.dumps({"ckpt": str(args.ckpt), "kind": stage1.kind, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
