"""MODEL_CARD.md next to a trained pipeline run: data, metrics, intended use, limits, how to reproduce."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cervspine import TARGETS, __version__
from cervspine.io.rsna import RsnaIndex, is_synthetic
from cervspine.runs.info import data_fingerprint, git_commit

STAGES = ("stage1", "stage2")


def _stage_info(run_dir: Path, stage: str) -> dict[str, Any]:
    """Experiment, model class and backbone of a stage, from its train folder's resolved config."""
    cfg_path = run_dir / stage / "resolved_config.yaml"
    if not cfg_path.is_file():
        return {}
    cfg = OmegaConf.load(cfg_path)
    target = str(OmegaConf.select(cfg, "model._target_", default="?"))
    return {
        "experiment": OmegaConf.select(cfg, "experiment_name", default="?"),
        "model": target.rsplit(".", 1)[-1],
        "backbone": OmegaConf.select(cfg, "model.backbone.name", default="?"),
        "input_size": OmegaConf.select(cfg, "data.input_size", default="?"),
        "epochs": OmegaConf.select(cfg, "trainer.max_epochs", default="?"),
    }


def reproduce_command(cfg: DictConfig, run_dir: Path) -> str:
    """The pipeline command with this run's overrides (Hydra's record when there is one)."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        overrides = []
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.insert(0, f"data.root={cfg.data.root}")
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(1, f"experiment={cfg.get('experiment_name') or 'demo'}")
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides.append(f"hydra.run.dir={run_dir}")
    quoted = [f"'{o}'" if any(c in o for c in ' []{}(),"') else o for o in overrides]
    return "python -m cervspine.pipeline " + " ".join(quoted)


def _metrics_section(metrics: dict[str, Any] | None, synthetic: bool) -> list[str]:
    if not metrics:
        return ["No evaluation metrics were recorded for this run."]
    kind = "SYNTHETIC data — these numbers say nothing about real CT" if synthetic else "real data"
    lo, hi = metrics.get("rsna_score_ci95", [float("nan")] * 2)
    lines = [
        f"Validation ({kind}), fold {metrics.get('fold')}, {metrics.get('n_studies')} studies:",
        "",
        f"- competition score `rsna_score` (weighted log loss, lower is better): "
        f"**{metrics['rsna_score']:.4f}** (95% bootstrap CI {lo:.3f}–{hi:.3f})",
        f"- prior-only baseline: {metrics.get('prior_baseline_rsna_score', float('nan')):.4f}",
        "",
        "| target | AUROC | F1 | accuracy | precision | recall | positives |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in TARGETS:
        r = metrics.get("per_target", {}).get(t)
        if r:
            vals = " | ".join(f"{r[k]:.3f}" for k in ("auroc", "f1", "accuracy", "precision", "recall"))
            lines.append(f"| {t} | {vals} | {int(r.get('n_positive', 0))} |")
    lines += [
        "",
        "Thresholded metrics use p > 0.5; `evaluate report=true` gives curves and an operating threshold.",
    ]
    return lines


def _ci(ci: Any) -> str:
    lo, hi = (float(v) for v in ci)
    return f"{lo:.2f}–{hi:.2f}"


def _operating_point_section(run_dir: Path, metrics: dict[str, Any] | None) -> list[str]:
    """The run's operating point (``operating_point.json``, chosen by evaluate) with its validation
    sensitivity and specificity, or a line saying there is none."""
    from cervspine.jobs.operating_point import FILE_NAME, load_operating_point
    from cervspine.scoring.thresholds import OperatingPoint

    if (run_dir / FILE_NAME).is_file():
        op = load_operating_point(run_dir)
    elif metrics and metrics.get("operating_point"):
        op = OperatingPoint.from_dict(metrics["operating_point"])
    else:
        return [f"No operating point recorded: `evaluate` writes `{FILE_NAME}` into the run folder."]
    lines = [
        f"`predict` and `serve` call a fracture *suspected* when p > threshold; rule: {op.description}, "
        f"chosen on {op.provenance.get('chosen_on', '?')} (`{run_dir / FILE_NAME}`).",
        "",
        "| level | threshold | sensitivity (95% CI) | specificity (95% CI) | positives / negatives |",
        "|---|---|---|---|---|",
    ]
    for name, lv in (("patient", op.patient), ("vertebra (C1–C7 pooled)", op.vertebra)):
        lines.append(
            f"| {name} | {lv.threshold:.4f} | {lv.sensitivity:.3f} ({_ci(lv.sensitivity_ci95)}) | "
            f"{lv.specificity:.3f} ({_ci(lv.specificity_ci95)}) | {lv.n_positive} / {lv.n_negative} |"
        )
    lines += [
        "",
        f"Intervals: percentile bootstrap over the {op.n_studies} studies ({op.n_bootstrap} resamples), the "
        "thresholds held fixed; a threshold chosen to reach a target on the same studies meets it there by "
        "construction — expect less on new data. Override with `operating_point=PATH` or "
        "`report_threshold=`.",
    ]
    return lines


def model_card(cfg: DictConfig, run_dir: str | Path, metrics: dict[str, Any] | None = None) -> str:
    """The card's Markdown text for the pipeline run in ``run_dir`` (config ``cfg``)."""
    run_dir = Path(run_dir)
    root = Path(cfg.data.root)
    synthetic = is_synthetic(root)
    index = RsnaIndex.from_root(root, exclude=tuple(cfg.data.exclude), require_images=False)
    members = sorted(d.name for d in run_dir.glob("stage2_*") if (d / "resolved_config.yaml").is_file())
    stages = {s: _stage_info(run_dir, s) for s in (*STAGES, *members)}
    commit = git_commit() or "unknown (not a git checkout)"
    banner = (
        [
            "> **SYNTHETIC DATA.** Trained and evaluated on generated volumes: the model and its numbers say "
            "nothing about real CT.",
            "",
        ]
        if synthetic
        else []
    )
    stage_lines = [
        f"- **{s}**: {i.get('model', '?')} (experiment `{i.get('experiment', '?')}`, backbone "
        f"`{i.get('backbone', '?')}`, input {i.get('input_size', '?')} px, "
        f"max_epochs {i.get('epochs', '?')}) — "
        f"`{run_dir / s}`"
        for s, i in stages.items()
    ]
    if members:
        stage_lines.append("- stage 2 is an ensemble of the stage2* models: the mean of their study logits")
    n_pos = int(index.labels["patient_overall"].sum()) if len(index.labels) else 0
    lines = [
        f"# Model card — cervspine `{cfg.get('experiment_name') or '?'}`",
        "",
        *banner,
        f"Generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} by cervspine "
        f"{__version__}, git commit `{commit}`.",
        "",
        "## Model",
        "",
        "Two stages on axial CT slices: stage 1 finds which of C1–C7 each slice shows and the spine's box; "
        "stage 2 scores fractures per slice (or per vertebra); slice scores are aggregated per study "
        "(C1–C7) and patient_overall = 1 − Π(1 − C_v); the slice classifier's study probabilities are then "
        "Platt-scaled by a calibration fitted on its validation fold (`cervspine.scoring.calibration`).",
        "",
        *stage_lines,
        "",
        "## Data",
        "",
        f"- root: `{root}` ({'SYNTHETIC' if synthetic else 'real'} data)",
        f"- fingerprint: `{data_fingerprint(root)}`",
        f"- labelled studies: {len(index.labels)} ({n_pos} with a fracture); test studies: "
        f"{len(index.test_uids)}; excluded: {len(index.excluded)}",
        f"- folds: {cfg.data.n_folds} (seed {cfg.data.fold_seed}); validation fold: {cfg.data.fold}",
        "",
        "## Metrics",
        "",
        *_metrics_section(metrics, synthetic),
        "",
        "## Operating point",
        "",
        *_operating_point_section(run_dir, metrics),
        "",
        "## Intended use",
        "",
        "Research and teaching: a reproducible baseline for the RSNA 2022 Cervical Spine Fracture Detection "
        "task. It is **not a medical device** and must not be used to diagnose or triage patients.",
        "",
        "## Limits",
        "",
        "- Validated on one fold of the data above; the intervals show how little a small fold says.",
        "- Expects axial cervical-spine CT like the RSNA 2022 set (bone kernel, ≤1 mm slices); other "
        "protocols, scanners, implants and children are untested.",
        "- Labels are study-level per vertebra; stage-1 training masks come from a model and are noisy.",
        "- Probabilities are not calibrated beyond what the evaluation's calibration plot shows.",
        *(
            ["- Trained on synthetic volumes only: retrain on real data before drawing any conclusion."]
            if synthetic
            else []
        ),
        "",
        "## How to reproduce",
        "",
        "```bash",
        f"git checkout {commit.removesuffix('-dirty')}   # the run's tree had local changes"
        if commit.endswith("-dirty")
        else f"git checkout {commit}",
        reproduce_command(cfg, run_dir),
        f"python -m cervspine.evaluate data.root={root} data.image_size={cfg.data.image_size} "
        f"data.n_folds={cfg.data.n_folds} data.fold_seed={cfg.data.fold_seed} fold={cfg.data.fold} "
        f"run_dir={run_dir} report=true",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(cfg: DictConfig, run_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write MODEL_CARD.md into the run folder and each stage's train folder; returns the run's card."""
    run_dir = Path(run_dir)
    text = model_card(cfg, run_dir, metrics)
    for folder in [run_dir, *(run_dir / s for s in STAGES)]:
        if folder.is_dir():
            tmp = folder / ".MODEL_CARD.md.tmp"
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(folder / "MODEL_CARD.md")
    return run_dir / "MODEL_CARD.md"
