"""The whole job, resumable step by step: preprocess → train stage 1 → stage-1 inference on every study →
train stage 2 (and any ``stage2_ensemble`` members) → evaluate the validation fold → predict the folder's
test.csv → model card.

Every step runs a real config: each stage's train config is composed from its recipe
(``conf/experiment/``) and the evaluate and predict steps compose ``conf/evaluate.yaml`` and
``conf/predict.yaml``; the pipeline hands them its data settings and its trained checkpoints as config
values (merged, never retyped as override strings).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from cervspine.cache import CachedStudy, CacheParams, preprocess
from cervspine.data.stage1_table import vertebra_extents
from cervspine.inference import Runtime, Stage1, load_stage1
from cervspine.io.atomic import write_csv_atomic
from cervspine.io.rsna import RsnaIndex
from cervspine.jobs.steps import Steps, file_key, input_key
from cervspine.runs.info import data_fingerprint
from cervspine.runs.layout import STAGE_DIRS, best_checkpoint

log = logging.getLogger(__name__)
FORWARDED_DATA_KEYS = (
    "root",
    "image_size",
    "cache_dir",
    "segmentation_method",
    "fold",
    "n_folds",
    "fold_seed",
)
TASK_KEYS = ("device", "batch_size", "workers", "n_bootstrap")  # the pipeline's settings its tasks share


def stage_config(
    cfg: DictConfig, stage: str, output_dir: Path, data: dict[str, Any] | None = None
) -> DictConfig:
    """The train config of one stage (``stage``: its key in the pipeline config, dotted for nested ones):
    its recipe and overrides, then the pipeline's data settings, seed and output folder merged in."""
    spec = OmegaConf.select(cfg, stage)
    stage_cfg = compose(
        config_name="train", overrides=[f"experiment={spec.experiment}", *spec.get("overrides", [])]
    )
    forwarded = {k: cfg.data[k] for k in FORWARDED_DATA_KEYS}
    merged = {
        "data": {**forwarded, "exclude": list(cfg.data.exclude), **(data or {})},
        "paths": {"output_dir": str(output_dir)},
        "seed": cfg.seed,
        "print_config": False,
    }
    return OmegaConf.merge(stage_cfg, merged)


def task_config(cfg: DictConfig, task: str, run_dir: Path, stage1: Path, stage2: list[Path]) -> DictConfig:
    """The ``evaluate`` or ``predict`` config as its entry point composes it (plus ``cfg.<task>.overrides``),
    with the pipeline's data and shared settings and this run's checkpoints (several: an ensemble)."""
    extra = OmegaConf.select(cfg, f"{task}.overrides", default=[]) or []
    task_cfg = compose(config_name=task, overrides=list(extra))
    with open_dict(task_cfg):
        task_cfg.data = OmegaConf.to_container(cfg.data, resolve=True)
        for key in TASK_KEYS:
            task_cfg[key] = cfg[key]
        task_cfg.run_dir = str(run_dir)
        task_cfg.ckpt = {"stage1": str(stage1), "stage2": [str(p) for p in stage2]}
        task_cfg.paths.output_dir = str(run_dir)
        if "fold" in task_cfg:
            task_cfg.fold = cfg.data.fold
    return task_cfg


def stage1_inference(stage1: Stage1, cache_dir: Path, uids: list[str], out: Path) -> None:
    """Per-slice vertebra probabilities and spine boxes for every study → one Parquet table, and the
    first/last slice of each level beside it (``vertebra_extents.csv``)."""
    frames = []
    for uid in uids:
        study = CachedStudy(cache_dir / uid)
        frames.append(stage1.run(study).frame(study))
    table = pd.concat(frames, ignore_index=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out)
    write_csv_atomic(vertebra_extents(table), out.with_name("vertebra_extents.csv"))


def _train(stage_cfg: DictConfig) -> None:
    from cervspine.training.fit import train

    train(stage_cfg)


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """The pipeline config's job; returns the evaluation metrics, the submission path and the run folder."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(run_dir, force=cfg.get("force", False))
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude))
    cache_dir = Path(cfg.data.cache_dir)
    params = CacheParams(image_size=cfg.data.image_size, segmentation_method=cfg.data.segmentation_method)
    data_key = data_fingerprint(cfg.data.root)

    report = preprocess(index, cache_dir, params, workers=cfg.workers, progress=cfg.get("progress", True))
    if not report.ok:
        raise RuntimeError(f"preprocessing failed for {len(report.failed)} studies: {report.failed}")

    s1_dir = run_dir / STAGE_DIRS["stage1"]
    s1_cfg = stage_config(cfg, "stage1", s1_dir)
    s1_key = input_key(OmegaConf.to_container(s1_cfg, resolve=True), data_key)
    steps.run("train_stage1", s1_key, [s1_dir / "train_summary.json"], lambda: _train(s1_cfg))
    s1_ckpt = best_checkpoint(s1_dir)

    table = run_dir / "stage1_predictions.parquet"
    uids = sorted(set(index.train_uids) | set(index.test_uids))
    inf_key = input_key(file_key(s1_ckpt), [str(u) for u in uids], data_key)
    runtime = Runtime.create(device=cfg.device, batch_size=cfg.batch_size)
    steps.run(
        "stage1_inference",
        inf_key,
        [table],
        lambda: stage1_inference(load_stage1(s1_ckpt, runtime), cache_dir, uids, table),
    )

    s2_ckpts = []  # stage 2, then each stage2_ensemble member (stage2_<name>/): evaluated as one ensemble
    members = [("stage2", run_dir / STAGE_DIRS["stage2"])] + [
        (f"stage2_ensemble.{name}", run_dir / f"{STAGE_DIRS['stage2']}_{name}")
        for name in cfg.get("stage2_ensemble") or {}
    ]
    for stage, train_dir in members:
        s2_cfg = stage_config(cfg, stage, train_dir, {"stage1_predictions": str(table)})
        s2_key = input_key(OmegaConf.to_container(s2_cfg, resolve=True), inf_key)
        step = "train_" + stage.replace("stage2_ensemble.", "stage2_")
        steps.run(step, s2_key, [train_dir / "train_summary.json"], lambda c=s2_cfg: _train(c))
        s2_ckpts.append(best_checkpoint(train_dir))

    models_key = input_key(file_key(s1_ckpt), *[file_key(c) for c in s2_ckpts], data_key)
    eval_cfg = task_config(cfg, "evaluate", run_dir, s1_ckpt, s2_ckpts)
    steps.run("evaluate", models_key, [run_dir / "metrics.json"], lambda: _evaluate(eval_cfg))
    submission = run_dir / "submission.csv"
    if len(index.test):
        pred_cfg = task_config(cfg, "predict", run_dir, s1_ckpt, s2_ckpts)
        steps.run("predict", models_key, [submission], lambda: _predict(pred_cfg))
    return {"submission": submission if submission.exists() else None, "run_dir": run_dir}


def _evaluate(eval_cfg: DictConfig) -> None:
    from cervspine.jobs.evaluate import evaluate

    evaluate(eval_cfg)


def _predict(pred_cfg: DictConfig) -> None:
    from cervspine.jobs.predict import predict_folder

    result = predict_folder(pred_cfg)
    if result.failed:
        raise RuntimeError(f"could not score {len(result.failed)} test studies: {result.failed}")
