"""Training through the real Hydra configs: every experiment composes and runs, resume continues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cervspine.models.safe_load import load_checkpoint
from cervspine.train import train
from tests.helpers import TINY_DATA, TINY_STAGE1, TINY_STAGE2, hydra_config, tiny_pipeline_overrides

CONF = Path(__file__).parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))  # train recipes
PIPELINE_EXPERIMENTS = sorted(p.stem for p in (CONF / "pipelines" / "experiment").glob("*.yaml"))
STAGE_OF = {"vertebrae": TINY_STAGE1, "fracture": TINY_STAGE2}


def _overrides(tiny_root: Path, experiment: str) -> list[str]:
    stage = "vertebrae" if experiment.startswith("vertebrae") else "fracture"
    ov = [
        f"experiment={experiment}",
        f"data.root={tiny_root}",
        *TINY_DATA,
        *STAGE_OF[stage],
        "print_config=false",
    ]
    if experiment.startswith("fracture_seq"):  # 7 sequences per study: few slices each
        ov += ["data.n_slices=4"]
    if not experiment.endswith("_demo"):  # the real-data recipes, shrunk to one tiny CPU batch
        ov += [
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "data.batch_size=2",
            "data.image_size=64",
            "data.num_workers=0",
            "data.preprocess_workers=1",
            "model.backbone.pretrained=false",  # ImageNet by default; nothing is downloaded in tests
        ]
    return ov


def test_experiment_list_is_complete():
    for name in ("vertebrae_demo", "vertebrae_b5", "fracture_demo", "fracture_b5"):
        assert name in EXPERIMENTS
    for name in ("fracture_seq_demo", "fracture_seq"):
        assert name in EXPERIMENTS
    assert {"demo", "demo_seq", "demo_gpu", "demo_ensemble"} <= set(PIPELINE_EXPERIMENTS)
    assert not set(EXPERIMENTS) & set(PIPELINE_EXPERIMENTS)  # one name, one kind of job


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_train_experiment_runs_fast_dev_run(experiment, tiny_root, tmp_path):
    with hydra_config("train", [*_overrides(tiny_root, experiment), "debug=fast_dev_run"], tmp_path) as cfg:
        metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (tmp_path / "resolved_config.yaml").is_file() and (tmp_path / "run_info.json").is_file()
    assert "git_commit" in (tmp_path / "run_info.json").read_text()


def test_pipeline_experiment_composes_for_train_and_pipeline(tiny_root, tmp_path):
    with hydra_config("pipeline", ["experiment=demo", f"data.root={tiny_root}"], tmp_path) as cfg:
        assert cfg.stage1.experiment == "vertebrae_column_demo" and cfg.stage2.experiment == "fracture_demo"
        assert cfg.data.image_size == 128


def test_demo_gpu_composes_gpu_bf16_stages(tiny_root, tmp_path):
    from cervspine.jobs.pipeline import stage_config

    with hydra_config("pipeline", ["experiment=demo_gpu", f"data.root={tiny_root}"], tmp_path) as cfg:
        assert cfg.experiment_name == "demo_gpu" and cfg.data.image_size == 128
        for stage, experiment in (("stage1", "vertebrae_column_demo"), ("stage2", "fracture_demo")):
            stage_cfg = stage_config(cfg, stage, tmp_path / stage)
            assert stage_cfg.experiment_name == experiment
            assert (stage_cfg.trainer.accelerator, stage_cfg.trainer.precision) == ("gpu", "bf16-mixed")
            assert stage_cfg.data.num_workers == 8


def test_a_stage_seed_override_wins_over_the_pipeline_seed(tiny_root, tmp_path):
    from cervspine.jobs.pipeline import stage_config

    overrides = ["experiment=demo", f"data.root={tiny_root}", "seed=5", 'stage2.overrides=["seed=7"]']
    with hydra_config("pipeline", overrides, tmp_path) as cfg:
        assert stage_config(cfg, "stage1", tmp_path / "s1").seed == 5
        assert stage_config(cfg, "stage2", tmp_path / "s2").seed == 7


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)
def test_gpu_demo_trains_both_stages_on_a_gpu_in_bf16(tiny_root, tmp_path):
    """experiment=demo_gpu, shrunk to the tiny folder: both stages train on the GPU in bf16-mixed (the
    stage settings of conf/pipelines/experiment/demo_gpu.yaml, then the tiny ones), and the run scores."""
    import json

    from omegaconf import OmegaConf

    from cervspine.pipeline import run

    with hydra_config("pipeline", ["experiment=demo_gpu", f"data.root={tiny_root}"], tmp_path) as cfg:
        s1, s2 = (list(cfg[stage].overrides) for stage in ("stage1", "stage2"))  # the GPU settings
    assert "trainer.accelerator=gpu" in s1 and "trainer.accelerator=gpu" in s2
    overrides = tiny_pipeline_overrides(tiny_root, "demo_gpu", stage1=s1, stage2=s2)
    torch.cuda.reset_peak_memory_stats()
    with hydra_config("pipeline", overrides, tmp_path / "run") as cfg:
        result = run(cfg)
    assert torch.cuda.max_memory_allocated() > 0  # the models ran on the GPU
    for stage in ("stage1", "stage2"):
        resolved = OmegaConf.load(tmp_path / "run" / stage / "resolved_config.yaml")
        assert (resolved.trainer.accelerator, resolved.trainer.precision) == ("gpu", "bf16-mixed")
        summary = json.loads((tmp_path / "run" / stage / "train_summary.json").read_text())
        assert summary["global_step"] == 2 and Path(summary["best_model_path"]).is_file()
    assert np.isfinite(result["metrics"]["rsna_score"]) and result["submission"].is_file()


def _short(tiny_root: Path, epochs: int) -> list[str]:
    """fracture_demo for ``epochs`` of two batches on timm's 0.4M-parameter test_resnet (these tests check
    the training machinery, not what resnet18 learns)."""
    return [
        *_overrides(tiny_root, "fracture_demo"),
        "model.backbone.name=test_resnet",
        f"trainer.max_epochs={epochs}",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=2",
    ]


@pytest.fixture(scope="module")
def seeded_run(tiny_root, tmp_path_factory):
    """One short run with seed=7: (run folder, metrics, objects, its final weights)."""
    out = tmp_path_factory.mktemp("seeded_run")
    with hydra_config("train", [*_short(tiny_root, 1), "seed=7"], out) as cfg:
        metrics, objects = train(cfg)
    state = {k: v.clone() for k, v in objects["model"].state_dict().items()}
    return out, metrics, objects, state


def test_resume_from_last_continues_the_global_step(tiny_root, tmp_path):
    with hydra_config("train", _short(tiny_root, 1), tmp_path) as cfg:
        _, first = train(cfg)
    assert first["trainer"].global_step == 2
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    with hydra_config("train", [*_short(tiny_root, 2), "ckpt_path=last"], tmp_path) as cfg:
        _, second = train(cfg)
    assert second["trainer"].global_step == 4  # continued, not restarted
    assert second["trainer"].current_epoch == 2


def test_validation_scores_studies_and_checkpoints_on_rsna_score(seeded_run):
    _, metrics, objects, _ = seeded_run
    assert 0 < metrics["val/rsna_score"] < 10
    assert 0 < metrics["val/rsna_score_uncalibrated"] < 10
    assert objects["summary"]["monitor"] == "val/rsna_score"
    best = Path(objects["summary"]["best_model_path"])
    assert best.is_file()
    # the study calibration fitted on the fold travels in the checkpoint and is what inference applies
    from cervspine.inference import Runtime, load_stage2
    from cervspine.scoring.calibration import IDENTITY

    saved = load_checkpoint(best)["state_dict"]["study_calibration"]
    assert saved.shape == (4,) and tuple(saved.tolist()) != IDENTITY
    stage2 = load_stage2(best, Runtime.create(device="cpu"))
    assert stage2.kind == "slice" and stage2.calibrated
    p = torch.full((1, 8), 0.3).numpy()
    assert not np.allclose(stage2.model.calibrate(p), p)


def test_same_seed_repeats_a_cpu_run_exactly(seeded_run, tiny_root, tmp_path):
    _, _, _, first = seeded_run
    with hydra_config("train", [*_short(tiny_root, 1), "seed=7"], tmp_path) as cfg:
        _, objects = train(cfg)
    second = objects["model"].state_dict()
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k


@pytest.mark.slow
def test_vertebrae_detector_learns_on_held_out_synthetic_studies(tmp_path):
    """A short CPU training reaches per-vertebra AUROC well above chance on the validation studies."""
    from cervspine.synthetic import write_rsna_folder

    root = tmp_path / "rsna"
    write_rsna_folder(root, n_train=16, n_test=0, size=64, slices=(60, 70), seed=21, seg_fraction=1.0)
    overrides = [
        "experiment=vertebrae_demo",
        f"data.root={root}",
        *TINY_DATA,
        *TINY_STAGE1,
        "data.slice_step=1",  # every slice of these 60-70-slice studies (the recipe steps 3 on 300)
        "trainer.max_epochs=3",
        "print_config=false",
    ]
    with hydra_config("train", overrides, tmp_path / "run") as cfg:
        metrics, _ = train(cfg)
    assert metrics["val/auroc_macro"] > 0.75  # chance is 0.5; measured ≈0.9–0.95 on the demo folder
