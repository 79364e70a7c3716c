"""Stage-2 comparison: the slice classifier under each aggregation vs the per-vertebra sequence model.

Both use the same stage-1 checkpoint and the inference path of ``cervspine.evaluate`` (Predictor): per
study, stage 1 runs once, then each stage-2 model; the slice model's per-slice outputs are aggregated
with every method. Scores are of the raw study probabilities; with ``--calibrate-on NAME`` every model
also gets a study calibration (``cervspine.scoring.calibration``) fitted on that evaluation set's predictions,
applied to the other sets and cross-fitted on that set itself. Writes a JSON of the metrics and prints a
Markdown table.

    python -m experiments.stage2_comparison --stage1 S1.ckpt --slice S2.ckpt --seq NAME=SEQ.ckpt \\
        --eval fold0=/tmp/cmp/train:0 --eval holdout=/tmp/cmp/holdout --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from cervspine import TARGETS, VERTEBRAE
from cervspine.cache import CachedStudy, CacheParams, preprocess
from cervspine.evaluate import select_studies
from cervspine.inference import Predictor, load_stage2
from cervspine.io.rsna import RsnaIndex, is_synthetic
from cervspine.scoring.aggregation import AGGREGATORS, aggregate_slices
from cervspine.scoring.calibration import StudyCalibration, cross_fitted
from cervspine.scoring.metrics import bootstrap_ci, classification_report, prior_baseline, rsna_score


def _pooled_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC over all (study, vertebra) pairs: rewards knowing which levels fracture most, too."""
    n = len(VERTEBRAE)
    return float(binary_auroc(torch.from_numpy(p[:, :n].ravel()), torch.from_numpy(y[:, :n].ravel()).long()))


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    r = classification_report(y, p)
    lo, hi = bootstrap_ci(y, p, rsna_score, n=500)
    return {
        "rsna_score": r["rsna_score"],
        "ci95": [lo, hi],
        "vertebra_auroc": r["macro"]["auroc"],
        "pooled_vertebra_auroc": _pooled_auroc(y, p),
        "patient_auroc": r["patient_overall"]["auroc"],
        **{f"auroc_{v}": r[v]["auroc"] for v in VERTEBRAE},
    }


def compare(args: argparse.Namespace) -> dict:
    slice_pred = Predictor.from_checkpoints(args.stage1, args.slice, device=args.device)
    slice_model = slice_pred.stage2[0]
    seq_models = {}
    for spec in args.seq:
        name, ckpt = spec.split("=", 1)
        seq_models[name] = load_stage2(ckpt, slice_pred.runtime)  # the same stage 1 for all
    size = slice_pred.image_size
    results = {}
    for spec in args.eval:
        set_name, rest = spec.split("=", 1)
        root, _, fold = rest.partition(":")
        index = RsnaIndex.from_root(root)
        uids, others = select_studies(index, int(fold) if fold else None, args.n_folds, args.fold_seed)
        cache = Path(root) / ".cervspine_cache" / f"s{size}"
        assert preprocess(index, cache, CacheParams(image_size=size), workers=2, progress=False).ok
        y = index.labels.loc[uids, list(TARGETS)].to_numpy(np.float64)
        labels = index.labels.loc[others] if others else RsnaIndex.from_root(args.prior_root).labels
        prior = prior_baseline(labels[list(TARGETS)].to_numpy(np.float64))
        preds = {m: [] for m in AGGREGATORS} | {name: [] for name in seq_models}
        times = {"stage1": [], "slice_stage2": []} | {name: [] for name in seq_models}
        for uid in uids:
            study = CachedStudy(cache / uid)
            t0 = time.perf_counter()
            s1 = slice_pred.stage1.run(study)
            t1 = time.perf_counter()
            inputs = slice_model.inputs(study, s1)
            z, probs, vis2 = inputs.slices, slice_model.slice_probabilities(inputs), inputs.visibility
            times["stage1"].append(t1 - t0)
            times["slice_stage2"].append(time.perf_counter() - t1)
            for m in AGGREGATORS:
                agg = {**slice_model.aggregation, "method": m}
                preds[m].append(aggregate_slices(probs, vis2[z], np.zeros(len(z)), z, **agg)[0][0])
            for name, model in seq_models.items():
                t2 = time.perf_counter()
                preds[name].append(model.score(model.inputs(study, s1)).probabilities)
                times[name].append(time.perf_counter() - t2)
        results[set_name] = {
            "root": root,
            "fold": fold or None,
            "n_studies": len(uids),
            "n_positive": int(y[:, -1].sum()),
            "synthetic": is_synthetic(root),
            "prior_rsna_score": rsna_score(y, np.tile(prior, (len(y), 1))),
            "prior_pooled_vertebra_auroc": _pooled_auroc(y, np.tile(prior, (len(y), 1))),
            "seconds_per_study": {k: float(np.mean(v)) for k, v in times.items()},
            "models": {m: _metrics(y, np.stack(p)) for m, p in preds.items()},
            "_raw": (y, {m: np.stack(p) for m, p in preds.items()}),
        }
    if args.calibrate_on:
        add_calibrated_scores(results, args.calibrate_on)
    for r in results.values():
        r.pop("_raw")
    return results


def add_calibrated_scores(results: dict, fit_set: str) -> None:
    """``rsna_score_calibrated`` per model: calibrations fitted on ``fit_set`` (cross-fitted there)."""
    y_fit, p_fit = results[fit_set]["_raw"]
    for name, r in results.items():
        y, preds = r["_raw"]
        for m, p in preds.items():
            cal = cross_fitted(y, p) if name == fit_set else StudyCalibration.fit(y_fit, p_fit[m])(p)
            r["models"][m]["rsna_score_calibrated"] = rsna_score(y, np.clip(cal, 1e-4, 1 - 1e-4))
        r["calibration_fitted_on"] = fit_set


def markdown(results: dict) -> str:
    lines = []
    for name, r in results.items():
        kind = "SYNTHETIC" if r["synthetic"] else "real"
        lines += [
            f"**{name}** ({kind} data, {r['n_studies']} studies, {r['n_positive']} positive; "
            f"prior-only rsna_score {r['prior_rsna_score']:.3f}, pooled vertebra AUROC "
            f"{r['prior_pooled_vertebra_auroc']:.3f})",
            "",
            "| stage 2 | rsna_score raw (95% CI) | calibrated | vertebra AUROC macro / pooled | "
            "patient AUROC | " + " | ".join(f"AUROC {v}" for v in VERTEBRAE) + " |",
            "|---|---|---|---|---|" + "---|" * len(VERTEBRAE),
        ]
        for m, x in r["models"].items():
            label = f"slice classifier, {m}" if m in AGGREGATORS else f"sequence model, {m}"
            per = " | ".join(f"{x[f'auroc_{v}']:.2f}" for v in VERTEBRAE)
            lo, hi = x["ci95"]
            cal = x.get("rsna_score_calibrated")
            cal_text = f"{cal:.3f}" if cal is not None else "–"
            lines.append(
                f"| {label} | {x['rsna_score']:.3f} ({lo:.3f}–{hi:.3f}) | {cal_text} | "
                f"{x['vertebra_auroc']:.3f} / "
                f"{x['pooled_vertebra_auroc']:.3f} | "
                f"{x['patient_auroc']:.3f} | {per} |"
            )
        t = r["seconds_per_study"]
        seq = "; ".join(
            f"sequence model {k} {v:.3f}" for k, v in t.items() if k not in ("stage1", "slice_stage2")
        )
        lines += [
            "",
            f"Inference per study (s, mean): stage 1 {t['stage1']:.3f}; stage 2: slice classifier "
            f"{t['slice_stage2']:.3f} (+ aggregation); {seq}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", required=True)
    ap.add_argument("--slice", required=True, help="FractureClassifier checkpoint")
    ap.add_argument(
        "--seq", action="append", required=True, help="NAME=VertebraSequenceClassifier checkpoint"
    )
    ap.add_argument("--eval", action="append", required=True, help="NAME=ROOT[:FOLD] (no fold: all studies)")
    ap.add_argument("--calibrate-on", help="NAME of an --eval set to fit study calibrations on")
    ap.add_argument("--prior-root", help="labelled folder for the prior when the evaluated one has no others")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = compare(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
