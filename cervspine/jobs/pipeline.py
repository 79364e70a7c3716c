"""The whole job, resumable step by step: preprocess → train stage 1 → stage-1 inference on every study →
train stage 2 (and any ``stage2_ensemble`` members) → evaluate the validation fold → predict the folder's
test.csv → model card.

Every step runs a real config: each stage's train config is composed from its recipe
(``conf/experiment/``) and the evaluate and predict steps compose ``conf/evaluate.yaml`` and
``conf/predict.yaml``; the pipeline hands them its data settings and its trained checkpoints as config
values (merged, never retyped as override strings). ``smoke=true`` shrinks the same job to minutes on a CPU
(``smoke_overrides``: merged into the pipeline config, appended to every stage's and task's overrides);
``stages_overrides`` reach every stage (``'stages_overrides=["trainer=ddp","trainer.devices=4"]'``, each
item quoted: a stage with more than one device trains in a ``python -m cervspine.train`` subprocess, where
Lightning's DDP launcher belongs).
Before preprocessing anything, every stage is checked (GPU, pretrained weights) and the cache folder's
parameters against the run's (:func:`preflight`, :func:`check_cache_params`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from cervspine.cache import CachedStudy, CacheParams, preprocess
from cervspine.cache.params import key_differences
from cervspine.data.stage1_table import vertebra_extents
from cervspine.inference import Runtime, Stage1, load_stage1
from cervspine.io.atomic import write_csv_atomic
from cervspine.io.errors import CervspineInputError
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
    "cache_compression",
    "cache_max_error_hu",
    "cache_hu_floor",
    "fold",
    "n_folds",
    "fold_seed",
)
TASK_KEYS = ("device", "batch_size", "workers", "n_bootstrap")  # the pipeline's settings its tasks share


def stage_config(
    cfg: DictConfig, stage: str, output_dir: Path, data: dict[str, Any] | None = None
) -> DictConfig:
    """The train config of one stage (``stage``: its key in the pipeline config, dotted for nested ones):
    its recipe and overrides, then the pipeline's data settings, seed (unless the stage's overrides set
    one: ``stage2.overrides=["seed=7"]`` retrains stage 2 alone with another seed) and output folder."""
    spec = OmegaConf.select(cfg, stage)
    overrides = [*spec.get("overrides", []), *(cfg.get("stages_overrides") or []), *smoke_extra(cfg, stage)]
    stage_cfg = compose(config_name="train", overrides=[f"experiment={spec.experiment}", *overrides])
    forwarded = {k: cfg.data[k] for k in FORWARDED_DATA_KEYS}
    own_seed = any(o.lstrip("+").split("=", 1)[0] == "seed" for o in overrides)
    merged = {
        "data": {**forwarded, "exclude": list(cfg.data.exclude), **(data or {})},
        "paths": {"output_dir": str(output_dir)},
        "seed": stage_cfg.seed if own_seed else cfg.seed,
        "print_config": False,
    }
    return OmegaConf.merge(stage_cfg, merged)


def task_config(cfg: DictConfig, task: str, run_dir: Path, stage1: Path, stage2: list[Path]) -> DictConfig:
    """The ``evaluate`` or ``predict`` config as its entry point composes it (plus ``cfg.<task>.overrides``),
    with the pipeline's data and shared settings and this run's checkpoints (several: an ensemble)."""
    extra = list(OmegaConf.select(cfg, f"{task}.overrides", default=[]) or [])
    if cfg.get("smoke"):
        extra += list(OmegaConf.select(cfg, f"smoke_overrides.{task}", default=[]) or [])
    task_cfg = compose(config_name=task, overrides=extra)
    with open_dict(task_cfg):
        task_cfg.data = OmegaConf.to_container(cfg.data, resolve=True)
        overridden = {o.lstrip("+").split("=", 1)[0] for o in extra}  # the task's own overrides win
        for key in TASK_KEYS:
            if key not in overridden:
                task_cfg[key] = cfg[key]
        task_cfg.run_dir = str(run_dir)
        task_cfg.ckpt = {"stage1": str(stage1), "stage2": [str(p) for p in stage2]}
        task_cfg.paths.output_dir = str(run_dir)
        if "fold" in task_cfg:
            task_cfg.fold = cfg.data.fold
    return task_cfg


def apply_smoke(cfg: DictConfig) -> None:
    """``smoke=true``: merge ``smoke_overrides.pipeline`` into ``cfg`` (in place; the stage and task lists
    are added where those configs are composed)."""
    if not isinstance(cfg.get("smoke", False), bool):
        raise CervspineInputError(f"smoke must be true or false, got {cfg.smoke!r}")
    if cfg.get("smoke"):
        with open_dict(cfg):
            cfg.merge_with(OmegaConf.select(cfg, "smoke_overrides.pipeline", default={}) or {})


def smoke_extra(cfg: DictConfig, stage: str) -> list[str]:
    """The train overrides ``smoke=true`` adds to ``stage``: every stage's, stage 1's or stage 2's (every
    stage-2 member's), then ``smoke_overrides.only.<stage>``."""
    if not cfg.get("smoke"):
        return []
    kind = "stage1" if stage == "stage1" else "stage2"
    lists = [OmegaConf.select(cfg, f"smoke_overrides.{k}", default=None) for k in ("stages", kind)]
    lists.append(OmegaConf.select(cfg, f"smoke_overrides.only.{stage}", default=None))
    return [str(o) for items in lists if items for o in items]


def shard_of(cfg: DictConfig) -> str | None:
    """The part of the cache one job builds: ``shard=i/N``, or ``shard=i shards=N`` (what a sweep gives:
    ``-m shards=8 'shard=range(8)'``); None without ``shard`` (the whole job)."""
    shard, shards = cfg.get("shard"), cfg.get("shards")
    if shard is None:
        if shards is not None:
            raise CervspineInputError(f"shards={shards} needs shard=i (0 <= i < {shards}), one job per i")
        return None
    text = f"{shard}/{shards}" if shards is not None else str(shard)
    parts = text.split("/")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts) or not int(parts[0]) < int(parts[1]):
        given = f"shard={shard!r}" + (f" shards={shards!r}" if shards is not None else "")
        raise CervspineInputError(
            f"{given}: give shard=i/N (or shard=i shards=N) with 0 <= i < N, e.g. shard=0/8; a sweep of "
            "all eight: -m shards=8 'shard=range(8)'"
        )
    return f"{int(parts[0])}/{int(parts[1])}"


def stage_keys(cfg: DictConfig) -> list[str]:
    """The pipeline keys of the trained stages: stage1, stage2, stage2_ensemble.<name>…"""
    return ["stage1", "stage2", *(f"stage2_ensemble.{n}" for n in cfg.get("stage2_ensemble") or {})]


def preflight(cfg: DictConfig, scratch: Path) -> None:
    """Every stage's recipe can run here, checked before hours of preprocessing: CUDA where a recipe asks
    for a GPU, and pretrained weights that are cached or downloadable (each fails in seconds, naming the
    override that fixes it)."""
    from cervspine.models.backbones import check_weights
    from cervspine.training.fit import check_accelerator

    for stage in stage_keys(cfg):
        stage_cfg = stage_config(cfg, stage, scratch / stage.replace(".", "_"))
        check_accelerator(stage_cfg, where=f"add to {stage}.overrides (or stages_overrides)")
        nodes = int(OmegaConf.select(stage_cfg, "trainer.num_nodes", default=1) or 1)
        if nodes > 1:
            recipe = stage_cfg.experiment_name
            raise CervspineInputError(
                f"{stage}: trainer.num_nodes={nodes}: the pipeline trains each stage on one node (all its "
                "GPUs: trainer.devices=N); train a stage on several nodes with python -m cervspine.train -m "
                f"launcher=slurm experiment={recipe} trainer=ddp trainer.num_nodes={nodes} ..."
            )
        try:  # a missing or unfit weights file is told now, not after preprocessing
            check_weights(OmegaConf.select(stage_cfg, "model.backbone", default=None))
        except (CervspineInputError, FileNotFoundError) as e:
            raise type(e)(f"{stage} ({stage_cfg.experiment_name}): {e} (in {stage}.overrides)") from None


def check_cache_params(cache_dir: Path, params: CacheParams, sample: int = 8) -> None:
    """Refuse a cache folder whose entries were built with other parameters than this run asks (a rebuild
    of the full set takes hours): names each differing parameter and the ways out."""
    if not cache_dir.is_dir():
        return
    for meta in sorted(cache_dir.glob("*/meta.json"))[:sample]:
        try:
            built = json.loads(meta.read_text()).get("params") or {}
        except (OSError, json.JSONDecodeError):
            continue  # unreadable entries are rebuilt by preprocess
        diff = key_differences(built, params)
        if diff:
            said = ", ".join(f"{k}={b!r} (this run: {w!r})" for k, (b, w) in diff.items())
            raise CervspineInputError(
                f"data.cache_dir={cache_dir}: its entries were built with {said} (e.g. {meta.parent.name}). "
                "Run with the parameters it was built with (data.image_size=…, data.segmentation_method=…, "
                "data.cache_max_error_hu=…, data.cache_hu_floor=…), "
                "point data.cache_dir at another folder, or delete this one to rebuild it"
            )


def stage1_inference(stage1: Stage1, cache_dir: Path, uids: list[str], out: Path) -> None:
    """Per-slice vertebra probabilities and spine boxes for every study → one Parquet table, and the
    first/last slice of each level beside it (``vertebra_extents.csv``)."""
    frames = []
    for uid in uids:
        study = CachedStudy(cache_dir / uid)
        frames.append(stage1.run(study).frame(study))
    _write_stage1_table(pd.concat(frames, ignore_index=True), out)


def _write_stage1_table(table: pd.DataFrame, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(out)
    write_csv_atomic(vertebra_extents(table), out.with_name("vertebra_extents.csv"))


def inference_processes(setting: Any) -> int:
    """``stage1_inference.processes``: a number, or auto = the CUDA devices (1 without)."""
    if setting in (None, "auto"):
        import torch

        return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)
    return max(1, int(setting))


def _stage1_part(ckpt: str, device: str, batch_size: int, threads: int | None, cache_dir: str,
                 uids: list[str], out: str) -> str:  # fmt: skip
    """One process's share of stage-1 inference (a spawned worker: everything by value)."""
    runtime = Runtime.create(device=device, batch_size=batch_size, num_threads=threads)
    stage1_inference(load_stage1(Path(ckpt), runtime), Path(cache_dir), uids, Path(out))
    return out


def stage1_inference_parallel(
    ckpt: Path, cache_dir: Path, uids: list[str], out: Path, *, processes: int, device: str, batch_size: int
) -> None:
    """:func:`stage1_inference` with the studies split over ``processes`` spawned workers (round robin
    over the CUDA devices, or CPU threads shared out), their tables joined in ``uids`` order."""
    import torch

    n = min(processes, len(uids))
    if n <= 1:
        runtime = Runtime.create(device=device, batch_size=batch_size)
        stage1_inference(load_stage1(ckpt, runtime), cache_dir, uids, out)
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    threads = None if gpus else max(1, (os.cpu_count() or 1) // n)
    scratch = out.parent / f".{out.stem}.parts"  # each part writes its own vertebra_extents.csv there too
    scratch.mkdir(exist_ok=True)
    jobs = [
        (f"cuda:{i % gpus}" if gpus else "cpu", uids[i::n], scratch / f"part{i}.parquet") for i in range(n)
    ]
    with ProcessPoolExecutor(n, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_stage1_part, str(ckpt), dev, batch_size, threads, str(cache_dir), part, str(path))
            for dev, part, path in jobs
        ]
        tables = [pd.read_parquet(f.result()) for f in futures]
    order = {u: i for i, u in enumerate(uids)}
    table = pd.concat(tables, ignore_index=True)
    table = table.sort_values("StudyInstanceUID", key=lambda c: c.map(order), kind="stable")
    _write_stage1_table(table.reset_index(drop=True), out)
    shutil.rmtree(scratch, ignore_errors=True)


def launches_processes(stage_cfg: DictConfig) -> bool:
    """Whether the stage trains on several devices or nodes (DDP): then in a subprocess of its own."""
    trainer = stage_cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    several = devices not in (1, "1", None) and not (isinstance(devices, list) and len(devices) == 1)
    return several or nodes > 1


def _train(stage_cfg: DictConfig) -> None:
    if launches_processes(stage_cfg):
        return _train_in_subprocess(stage_cfg)
    from cervspine.training.fit import train

    train(stage_cfg)


def _train_in_subprocess(stage_cfg: DictConfig) -> None:
    """``python -m cervspine.train`` on the stage's resolved config: Lightning's DDP launcher re-runs that
    command for its other ranks (each rank re-running the whole pipeline instead would repeat every step).
    The pipeline's own SLURM task count is hidden from it, so Lightning starts the ranks of this node."""
    out = Path(stage_cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = "pipeline_stage_config"
    (out / f"{name}.yaml").write_text(OmegaConf.to_yaml(stage_cfg, resolve=True))
    cmd = [sys.executable, "-m", "cervspine.train", f"--config-dir={out}", f"--config-name={name}",
           f"hydra.run.dir={out}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_NTASKS", "SLURM_NPROCS")}
    log.info("[pipeline] %s: %s", stage_cfg.get("experiment_name"), " ".join(cmd))
    done = subprocess.run(cmd, env=env, cwd=os.getcwd())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); its log is in {out}")


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """The pipeline config's job; returns the evaluation metrics, the submission path and the run folder.
    With ``shard`` (:func:`shard_of`) only that part of the cache is built (no GPU or weights needed)."""
    apply_smoke(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(run_dir, force=cfg.get("force", False))
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude))
    cache_dir = Path(cfg.data.cache_dir)
    params = CacheParams.from_config(cfg.data)
    shard = shard_of(cfg)
    if shard is not None:  # one of N preprocessing jobs, with this job's own cache settings: then stop
        check_cache_params(cache_dir, params)
        report = preprocess(index, cache_dir, params, workers=cfg.workers, shard=shard, progress=cfg.progress)
        if not report.ok:
            raise RuntimeError(f"preprocessing failed for {len(report.failed)} studies: {report.failed}")
        return {"shard": shard, "preprocess": report, "cache_dir": cache_dir, "run_dir": run_dir}
    data_key = data_fingerprint(cfg.data.root)
    preflight(cfg, run_dir)
    check_cache_params(cache_dir, params)

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
    processes = inference_processes(OmegaConf.select(cfg, "stage1_inference.processes", default="auto"))
    steps.run(
        "stage1_inference",
        inf_key,
        [table],
        lambda: stage1_inference_parallel(
            s1_ckpt, cache_dir, uids, table, processes=processes, device=cfg.device, batch_size=cfg.batch_size
        ),
    )

    s2_ckpts = []  # stage 2, then each stage2_ensemble member (stage2_<name>/): evaluated as one ensemble
    for stage in stage_keys(cfg)[1:]:
        train_dir = run_dir / stage.replace("stage2_ensemble.", f"{STAGE_DIRS['stage2']}_")
        s2_cfg = stage_config(cfg, stage, train_dir, {"stage1_predictions": str(table)})
        s2_key = input_key(OmegaConf.to_container(s2_cfg, resolve=True), inf_key)
        step = "train_" + stage.replace("stage2_ensemble.", "stage2_")
        steps.run(step, s2_key, [train_dir / "train_summary.json"], lambda c=s2_cfg: _train(c))
        s2_ckpts.append(best_checkpoint(train_dir))

    models_key = input_key(file_key(s1_ckpt), *[file_key(c) for c in s2_ckpts], data_key)
    eval_cfg = task_config(cfg, "evaluate", run_dir, s1_ckpt, s2_ckpts)
    with open_dict(eval_cfg):  # the pipeline's evaluate.report (default true) or the task's own report=true
        eval_cfg.report = bool(eval_cfg.report or OmegaConf.select(cfg, "evaluate.report", default=False))
    outputs = [run_dir / "metrics.json", *([run_dir / "report" / "report.html"] if eval_cfg.report else [])]
    eval_key = input_key(models_key, OmegaConf.to_container(eval_cfg, resolve=False))
    steps.run("evaluate", eval_key, outputs, lambda: _evaluate(eval_cfg))
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

    predict_folder(pred_cfg)  # every test row in submission.csv; studies not scored are in failures.csv
