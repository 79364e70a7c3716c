"""``python -m cervspine.pipeline data.root=DIR experiment=NAME``: the whole job, resumable step by step.

preprocess → train stage 1 → stage-1 inference on every study → train stage 2 → evaluate the validation
fold → predict the folder's test.csv. Each step records a key of its inputs in ``steps.json`` and is
skipped when its output exists and the key is unchanged. The run folder is stable
(``outputs/pipeline/<experiment>``), so rerunning the command resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

import cervspine.config  # noqa: F401
from cervspine.cache import CachedStudy, CacheParams, preprocess
from cervspine.data.stage1_table import vertebra_extents
from cervspine.inference import Predictor, stage1_frame
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.io.rsna import RsnaIndex
from cervspine.runs.info import data_fingerprint
from cervspine.runs.layout import best_checkpoint

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


def _key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_key(path: Path) -> str:
    st = Path(path).stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


class Steps:
    """steps.json: the input key each finished step was computed from."""

    def __init__(self, run_dir: Path, force: bool = False):
        self.path = run_dir / "steps.json"
        self.force = force
        self.keys: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, key: str, outputs: list[Path], fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless ``outputs`` exist and ``key`` matches; True when it ran."""
        if not self.force and self.keys.get(name) == key and all(p.exists() for p in outputs):
            log.info("[pipeline] %s: current, skipped", name)
            return False
        log.info("[pipeline] %s: running", name)
        fn()
        self.keys[name] = key
        write_json_atomic(self.path, self.keys)
        return True


def stage_config(cfg: DictConfig, stage: str, output_dir: Path, extra: list[str] | None = None) -> DictConfig:
    """The train config of one stage (``stage``: its key in the pipeline config, dotted for nested ones),
    composed from its experiment plus the pipeline's data settings."""
    spec = OmegaConf.select(cfg, stage)
    overrides = [f"experiment={spec.experiment}", *spec.get("overrides", []), *(extra or [])]
    overrides += [f"data.{k}={_override_value(cfg.data[k])}" for k in FORWARDED_DATA_KEYS]
    overrides += [
        f"data.exclude={_override_value(list(cfg.data.exclude))}",
        f"paths.output_dir={_override_value(str(output_dir))}",
        f"seed={cfg.seed}",
        "print_config=false",
    ]
    stage_cfg = compose(config_name="train", overrides=overrides)
    with open_dict(stage_cfg):
        stage_cfg.paths.output_dir = str(output_dir)
    return stage_cfg


def _override_value(v: Any) -> str:
    """A value as Hydra override syntax; strings always quoted (paths with spaces, commas, non-ASCII)."""
    if isinstance(v, list):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, (bool, int, float)):
        return str(v).lower() if isinstance(v, bool) else str(v)
    return "'" + str(v).replace("'", "\\'") + "'"


def _train_stage(stage_cfg: DictConfig) -> None:
    from cervspine.train import train

    train(stage_cfg)


def stage1_inference(stage1_ckpt: Path, cache_dir: Path, uids: list[str], out: Path, cfg: DictConfig) -> None:
    """Per-slice vertebra probabilities and spine boxes for every study → one Parquet table."""
    predictor = Predictor(stage1_ckpt, None, device=cfg.device, batch_size=cfg.batch_size)
    frames = []
    for uid in uids:
        study = CachedStudy(cache_dir / uid)
        vis, boxes = predictor.run_stage1(study)
        frames.append(stage1_frame(study, vis, boxes))
    table = pd.concat(frames, ignore_index=True)
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out)
    write_csv_atomic(
        vertebra_extents(table), out.with_name("vertebra_extents.csv")
    )  # first/last slice per level


def run(cfg: DictConfig) -> dict[str, Any]:
    """Entry point body; returns the evaluation metrics and the submission path."""
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

    s1_dir, s2_dir = run_dir / "stage1", run_dir / "stage2"
    s1_cfg = stage_config(cfg, "stage1", s1_dir)
    s1_key = _key(OmegaConf.to_container(s1_cfg, resolve=True), data_key)
    steps.run("train_stage1", s1_key, [s1_dir / "train_summary.json"], lambda: _train_stage(s1_cfg))
    s1_ckpt = best_checkpoint(s1_dir)

    table = run_dir / "stage1_predictions.parquet"
    uids = sorted(set(index.train_uids) | set(index.test_uids))
    inf_key = _key(_file_key(s1_ckpt), [str(u) for u in uids], data_key)
    steps.run(
        "stage1_inference", inf_key, [table], lambda: stage1_inference(s1_ckpt, cache_dir, uids, table, cfg)
    )

    s2_ckpts = []  # stage 2, then each stage2_ensemble member (stage2_<name>/): evaluated as one ensemble
    for stage, train_dir in [("stage2", s2_dir)] + [
        (f"stage2_ensemble.{name}", run_dir / f"stage2_{name}") for name in cfg.get("stage2_ensemble") or {}
    ]:
        s2_cfg = stage_config(
            cfg, stage, train_dir, [f"data.stage1_predictions={_override_value(str(table))}"]
        )
        s2_key = _key(OmegaConf.to_container(s2_cfg, resolve=True), inf_key)
        step = "train_" + stage.replace("stage2_ensemble.", "stage2_")
        steps.run(step, s2_key, [train_dir / "train_summary.json"], lambda c=s2_cfg: _train_stage(c))
        s2_ckpts.append(best_checkpoint(train_dir))

    models_key = _key(_file_key(s1_ckpt), *[_file_key(c) for c in s2_ckpts], data_key)
    sub_cfg = _task_config(cfg, run_dir, s1_ckpt, s2_ckpts)

    def _evaluate() -> None:
        from cervspine.evaluate import evaluate

        evaluate(sub_cfg)

    steps.run("evaluate", models_key, [run_dir / "metrics.json"], _evaluate)
    submission = run_dir / "submission.csv"
    if len(index.test):

        def _predict() -> None:
            from cervspine.predict import predict_folder

            result = predict_folder(sub_cfg)
            if result.failed:
                raise RuntimeError(f"could not score {len(result.failed)} test studies: {result.failed}")

        steps.run("predict", models_key, [submission], _predict)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    from cervspine.evaluate import print_metrics
    from cervspine.report.model_card import write_model_card

    print(f"model card: {write_model_card(cfg, run_dir, metrics)}")
    print_metrics(metrics)
    print(f"submission: {submission if submission.exists() else '(no test.csv studies)'}")
    return {"metrics": metrics, "submission": submission if submission.exists() else None, "run_dir": run_dir}


def _task_config(cfg: DictConfig, run_dir: Path, s1: Path, s2: list[Path]) -> DictConfig:
    """The evaluate/predict settings, taken from the pipeline config (``s2``: several → an ensemble)."""
    return OmegaConf.create(
        {
            "paths": {"output_dir": str(run_dir)},
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "run_dir": str(run_dir),
            "ckpt": {"stage1": str(s1), "stage2": [str(p) for p in s2] if len(s2) > 1 else str(s2[0])},
            "fold": cfg.data.fold,
            "device": cfg.device,
            "batch_size": cfg.batch_size,
            "workers": cfg.workers,
            "n_bootstrap": cfg.get("n_bootstrap", 1000),
            "study": None,
            "report": cfg.get("report", False),
            "report_threshold": cfg.get("report_threshold"),
        }
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as e:
        log.exception("pipeline failed")
        print(f"pipeline failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
