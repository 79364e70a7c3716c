"""patient_overall from the slice classifier's levels: noisy-or, max, or noisy-or of the calibrated levels,
compared on the validation fold and shown on held-out folders (SYNTHETIC).

The slice model's study probabilities are top-k means of slice probabilities: a fracture-free level
still scores its few highest slices, so the noisy-or over seven levels, 1 − Π(1 − C_v), adds up seven
such floors, and a study's patient_overall ranks by how many levels it has as much as by how sure the
model is of any one. ``max`` takes the surest level only; the third rule calibrates the levels first (the
floors fall toward 0) and then combines them. Each rule is scored as training scores it:
on the run's stage-2 validation fold, every study calibrated by a fit on the fold's other studies and
pulled toward the training prior as far as the fold warrants (the logged ``val/rsna_score``); on each
held-out folder, with the calibration fitted on the whole fold (what a checkpoint saves). The slice
probabilities are computed once per study; only the aggregation differs. Choose on the fold; the held-out
folders (never used for tuning) show whether the choice carries.

    python -m experiments.overall_rule --run RUN --holdout /work/data/holdout_default [...] \\
        --out experiments/overall_rule.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score

from cervspine import TARGETS
from cervspine.cache import CachedStudy
from cervspine.data.folds import assign_folds
from cervspine.inference import load_predictor
from cervspine.io.rsna import RsnaIndex
from cervspine.scoring.aggregation import DEFAULT_EPS, aggregate_slices, fill_unlocalised
from cervspine.scoring.answer import localised_levels
from cervspine.scoring.calibration import (
    StudyCalibration,
    coherent_overall,
    cross_fitted,
    shrink,
    shrink_weights,
)
from cervspine.scoring.metrics import rsna_score
from cervspine.scoring.probability import noisy_or
from experiments.stage1_localisation import cached

CALIBRATED_NOISY_OR = "noisy_or_of_calibrated_levels"
RULES = ("noisy_or", "max", CALIBRATED_NOISY_OR)
TARGET_COLUMNS = list(TARGETS)


def slice_outputs(predictor, cache_dir: Path, uids: list[str]) -> list[dict[str, np.ndarray]]:
    """Per study: the stage-2 slice probabilities, their visibility and which levels stage 1 found."""
    member = predictor.stage2[0]
    out = []
    for uid in uids:
        study = CachedStudy(cache_dir / uid).loaded()
        inputs = member.inputs(study, predictor.stage1.run(study))
        z = inputs.slices
        localised, _ = localised_levels(inputs.visibility, z, member.spec.visible_threshold)
        probs = member.slice_probabilities(inputs) if localised.any() else np.zeros((0, 7))
        out.append({"probs": probs, "vis": np.asarray(inputs.visibility)[z], "z": z, "localised": localised})
    return out


def raw_study(
    outputs: list[dict[str, np.ndarray]], aggregation: dict[str, Any], prior: np.ndarray
) -> np.ndarray:
    """(n, 8) aggregated, uncalibrated study probabilities (the prior where stage 1 found nothing)."""
    rows = []
    for o in outputs:
        if not o["localised"].any():
            rows.append(prior.copy())
            continue
        agg, _ = aggregate_slices(o["probs"], o["vis"], np.zeros(len(o["z"])), o["z"], **aggregation)
        rows.append(agg[0])
    return np.stack(rows)


def with_noisy_or(p: np.ndarray) -> np.ndarray:
    """(n, 8) with patient_overall replaced by the noisy-or of the (n, 7) levels."""
    out = np.array(p, dtype=np.float64)
    out[:, 7] = [noisy_or(levels) for levels in out[:, :7]]
    return out


def finish(outputs, calibrated: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """As the slice model answers: patient_overall at least every level's, the prior where not found."""
    calibrated = coherent_overall(calibrated)
    done = [fill_unlocalised(c, o["localised"], prior) for c, o in zip(calibrated, outputs)]
    return np.clip(np.stack(done), DEFAULT_EPS, 1 - DEFAULT_EPS)


def scores(y: np.ndarray, p: np.ndarray, prior: np.ndarray) -> dict[str, float]:
    return {
        "rsna_score": rsna_score(y, p),
        "prior_rsna_score": rsna_score(y, np.broadcast_to(prior, y.shape)),
        "patient_auroc": float(roc_auc_score(y[:, 7], p[:, 7]))
        if 0 < y[:, 7].sum() < len(y)
        else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="pipeline run folder (stage1/, stage2/)")
    ap.add_argument("--holdout", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    cfg = OmegaConf.load(args.run / "stage2" / "resolved_config.yaml")
    predictor = load_predictor(args.run, device="cpu")
    model = predictor.stage2[0].model
    prior = model.training_prior()
    size = int(predictor.image_size)
    trained = dict(model.aggregation)

    root = Path(cfg.data.root)
    index = RsnaIndex.from_root(root, exclude=tuple(cfg.data.exclude))
    folds = assign_folds(index.labels, int(cfg.data.n_folds), int(cfg.data.fold_seed))
    val = [u for u in sorted(index.train_uids) if folds[u] == int(cfg.data.fold)]
    y_val = index.labels.loc[val, TARGET_COLUMNS].to_numpy(float)
    val_out = slice_outputs(predictor, Path(cfg.data.cache_dir), val)

    held = {}
    for h in args.holdout:
        hi = RsnaIndex.from_root(h)
        uids = sorted(hi.train_uids)
        y = hi.labels.loc[uids, TARGET_COLUMNS].to_numpy(float)
        held[h.name] = (y, slice_outputs(predictor, cached(h, size), uids))

    result: dict[str, Any] = {
        "run": str(args.run),
        "trained_aggregation": trained,
        "validation_fold": {"n_studies": len(val), "n_positive": int(y_val[:, 7].sum())},
        "rules": {},
        "note": "SYNTHETIC: these numbers say nothing about real CT",
    }
    for rule in RULES:
        agg = {**trained, "overall": "noisy_or" if rule == CALIBRATED_NOISY_OR else rule}
        raw = raw_study(val_out, agg, prior)
        held_raw = {name: raw_study(outs, agg, prior) for name, (_, outs) in held.items()}
        if rule == CALIBRATED_NOISY_OR:  # the levels calibrated first (out of fold), then combined
            levels = StudyCalibration.fit(y_val, raw)
            raw = with_noisy_or(cross_fitted(y_val, raw))
            held_raw = {name: with_noisy_or(levels(r)) for name, r in held_raw.items()}
        weights = shrink_weights(y_val, raw)
        fold_p = finish(val_out, shrink(cross_fitted(y_val, raw), prior, weights), prior)
        cal = StudyCalibration.fit(y_val, raw)
        rec = {"validation_cross_fitted": scores(y_val, fold_p, prior), "calibration": list(cal.params)}
        for name, (y, outs) in held.items():
            rec[name] = scores(y, finish(outs, shrink(cal(held_raw[name]), prior, weights), prior), prior)
            rec[name]["ratio_to_prior"] = rec[name]["rsna_score"] / rec[name]["prior_rsna_score"]
        result["rules"][rule] = rec
        print(rule, json.dumps(rec, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
