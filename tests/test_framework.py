"""The experiment framework through the real entry points: DDP under Hydra, Optuna, W&B offline, k-fold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cervspine.models.safe_load import load_checkpoint
from cervspine.train import train
from tests.helpers import hydra_config, train_overrides, writable_copy

SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"]
# the subprocess tests check where runs go and what they record, not learning: timm's 0.4M-parameter
# test_resnet instead of resnet18
MACHINERY = ["model.backbone.name=test_resnet", "+trainer.enable_progress_bar=false", *SHORT]


def _fracture(tiny_root: Path) -> list[str]:
    return train_overrides(tiny_root, "fracture_demo")


def _run(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cervspine.train", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_cpu_processes_make_exactly_one_run_folder(tiny_root, tmp_path):
    logs = tmp_path / "logs"
    _run(
        [
            *_fracture(tiny_root),
            *MACHINERY,
            "trainer=ddp_cpu",
            f"paths.log_dir={logs}",
            f"hydra.run.dir={logs}/run",
        ],
        tmp_path,
    )
    assert [p.name for p in logs.iterdir()] == ["run"]
    summary = json.loads((logs / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and Path(summary["best_model_path"]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]  # nothing stray in the working dir


def test_ddp_inside_a_multirun_stays_in_its_job_folder(tiny_root, tmp_path):
    logs, sweep = tmp_path / "logs", tmp_path / "sweep"
    _run(
        [
            "-m",
            *_fracture(tiny_root),
            *MACHINERY,
            "trainer=ddp_cpu",
            "data.fold=0,1",
            f"paths.log_dir={logs}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "train_summary.json").is_file()
    assert not logs.exists() or not any(logs.iterdir())  # no stray timestamped run folders


def test_optuna_sweep_runs_trials_and_resumes_from_sqlite(tiny_root, tmp_path, monkeypatch):
    """``python -m cervspine.train -m ... hparams_search=fracture_optuna`` run as ``python -m`` runs it, but
    in this process (the trials run in the sweeping process anyway): two trials, then one more resumed
    from the sqlite study."""
    import runpy

    import optuna

    db = tmp_path / "optuna.db"
    common = [
        "-m",
        *_fracture(tiny_root),
        *MACHINERY,
        "hparams_search=fracture_optuna",
        f"hydra.sweeper.storage=sqlite:///{db}",
        "hydra.sweeper.study_name=t",
        f"paths.root_dir={tmp_path}",
        f"paths.log_dir={tmp_path}/logs",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]

    def sweep(*args: str) -> None:
        monkeypatch.setattr(sys, "argv", ["cervspine.train", *common, *args])
        runpy.run_module("cervspine.train", run_name="__main__")

    sweep("hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/s")
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2 and all(0 < t.value < 10 for t in done)
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["0", "1"]
    sweep("hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}/s2")
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3


def test_wandb_offline_run_and_resume_keep_one_run_id(wandb_run, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with hydra_config("train", [*_fracture(tiny_root), *SHORT, "logger=wandb"], tmp_path) as cfg:
        assert cfg.logger.wandb.offline is True  # no W&B login: offline
    run = writable_copy(wandb_run, tmp_path / "run")  # the session's W&B run (logger=wandb), resumed here
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    run_id = json.loads((run / "run_info.json").read_text())["wandb_run_id"]
    assert runs[0].name.endswith(run_id)
    resume = [
        *_fracture(tiny_root),
        "model.backbone.name=test_resnet",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
        "logger=wandb",
        "ckpt_path=last",
    ]
    with hydra_config("train", resume, run) as cfg:
        _, objects = train(cfg)
    assert objects["trainer"].global_step == 4  # resumed from the copied last.ckpt
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the same W&B run, resumed


@pytest.mark.parametrize("experiment", ["fracture_demo", "fracture_seq_demo"])
def test_kfold_out_of_fold_predictions_gather_into_a_cv_score(experiment, tiny_root, tmp_path):
    """Both stage-2 models write ``oof_predictions.csv`` per fold run, and ``python -m cervspine.cv``'s
    ``cross_validate`` scores them together."""
    from cervspine.cv import cross_validate
    from cervspine.training.oof import OOF_FILE

    full_val = ["model.backbone.name=test_resnet", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                "+trainer.enable_progress_bar=false"]  # validate every slice  # fmt: skip
    for fold in range(3):
        ov = [*train_overrides(tiny_root, experiment), *full_val, f"data.fold={fold}"]
        with hydra_config("train", ov, tmp_path / str(fold)) as cfg:
            train(cfg)
        assert (tmp_path / str(fold) / OOF_FILE).is_file()
    out = cross_validate(tmp_path)
    # without stage-1 predictions, stage 2 uses the studies that have a segmentation
    usable = {p.name.removesuffix(".nii") for p in (tiny_root / "segmentations").glob("*.nii")}
    assert out["folds"] == [0, 1, 2]
    assert out["n_studies"] == len(usable)  # each usable study predicted exactly once
    assert 0 < out["rsna_score"] < 10
    table = pd.read_csv(tmp_path / "cv_table.csv")
    assert len(table) == 8 and set(table.columns) >= {"target", "auroc", "f1"}
    assert json.loads((tmp_path / "cv_metrics.json").read_text())["n_studies"] == len(usable)


@pytest.mark.parametrize("name", ["joblib", "slurm"])
def test_launcher_configs_compose(name, tiny_root, tmp_path):
    with hydra_config("train", [*_fracture(tiny_root), f"launcher={name}"], tmp_path) as cfg:
        assert cfg.experiment_name == "fracture_demo"


def test_ema_saves_averaged_weights_with_the_fitted_calibration(tiny_root, tmp_path):
    """callbacks=ema: the checkpoint holds the averaged weights, and the study calibration fitted at the
    last validation as it is (an average of it would still sit near its identity default)."""
    import torch

    from cervspine.scoring.calibration import IDENTITY

    ov = [
        *_fracture(tiny_root),
        "model.backbone.name=test_resnet",
        "callbacks=ema",
        "callbacks.ema.decay=0.9",
    ]
    ov += ["trainer.max_epochs=2", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2"]
    with hydra_config("train", ov, tmp_path) as cfg:
        train(cfg)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    weight = "fracture_head.weight"
    assert not torch.equal(averaged[weight], current[weight])  # the average, not the last step
    fitted = current["study_calibration"]
    assert tuple(fitted.tolist()) != IDENTITY
    assert torch.equal(averaged["study_calibration"], fitted)


@pytest.mark.parametrize("experiment", ["vertebrae_demo", "fracture_demo", "fracture_seq_demo"])
def test_demo_experiments_train_in_bf16_only_where_the_cpu_has_it(experiment, tmp_path, monkeypatch):
    import torch

    import cervspine.config as config

    with hydra_config("train", [f"experiment={experiment}"], tmp_path) as cfg:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")
        assert cfg.model.channels_last is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert config._cpu_precision() == "32-true"  # emulated bf16 would be slower than float32
