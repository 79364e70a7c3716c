"""The main job end to end on the tiny synthetic folder (the session's shared run): pipeline, evaluate,
predict, resume by steps, the stage-2 ensemble."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from cervspine import TARGETS
from cervspine.models.safe_load import load_checkpoint
from tests.helpers import hydra_config, writable_copy


def test_pipeline_ends_with_submission_and_metrics(shared_run, tiny_root):
    out = shared_run.dir
    assert shared_run.result["submission"] == out / "submission.csv"
    sub = pd.read_csv(out / "submission.csv")
    test = pd.read_csv(tiny_root / "test.csv")
    assert list(sub.columns) == ["row_id", "fractured"]
    assert sub["row_id"].tolist() == test["row_id"].tolist()  # test.csv's ids, in its order
    assert len(sub) == 8 * test["StudyInstanceUID"].nunique()
    assert sub["fractured"].notna().all() and ((sub["fractured"] > 0) & (sub["fractured"] < 1)).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == shared_run.result["metrics"]
    assert metrics["data"] == "synthetic" and "SYNTHETIC" in metrics["note"]
    assert "fitted on these same studies" in metrics["note"]  # stage 2 calibrated on this fold
    assert np.isfinite(metrics["rsna_score"]) and metrics["n_studies"] >= 1
    for uid in test["StudyInstanceUID"].unique():
        record = json.loads((out / "studies" / f"{uid}.json").read_text())
        assert set(TARGETS) <= set(record) and len(record["vertebra_extents"]) == 7


def test_stage1_table_has_one_row_per_slice_of_every_study(shared_run, tiny_root):
    from cervspine.data.stage1_table import COLUMNS, read_stage1

    out = shared_run.dir
    table = pd.read_parquet(out / "stage1_predictions.parquet")
    assert list(table.columns) == COLUMNS
    per_study = read_stage1(out / "stage1_predictions.parquet")
    folders = [*(tiny_root / "train_images").iterdir(), *(tiny_root / "test_images").iterdir()]
    assert set(per_study) == {p.name for p in folders}
    extents = pd.read_csv(out / "vertebra_extents.csv", dtype={"StudyInstanceUID": str})
    assert len(extents) == 7 * len(folders)
    for folder in folders:
        vis, boxes = per_study[folder.name]
        assert len(vis) == len(list(folder.glob("*.dcm")))
        assert ((vis >= 0) & (vis <= 1)).all()


def test_pipeline_rerun_skips_current_steps(shared_run):
    """The shared run's fixture ran the same command twice: nothing was recomputed the second time."""
    before, after = shared_run.mtimes_after_run, shared_run.mtimes_after_rerun
    assert {"submission.csv", "stage1_predictions.parquet", "metrics.json"} <= set(before)
    assert any(k.startswith("stage2_seq/") for k in before)  # the ensemble member's checkpoints too
    assert after == before


def test_predict_single_study_folder(shared_run, tiny_root, tmp_path):
    from cervspine.predict import predict_study_folder

    out = shared_run.dir
    folder = next((tiny_root / "test_images").iterdir())
    with hydra_config(
        "predict", [f"study={folder}", f"run_dir={out}", f"data.root={tiny_root}"], tmp_path
    ) as cfg:
        pred = predict_study_folder(cfg)
    assert pred.probabilities.shape == (8,)
    assert pred.probabilities[7] >= pred.probabilities[:7].max() - 1e-6  # P(any) ≥ P(each level)
    cached = json.loads((out / "studies" / f"{folder.name}.json").read_text())
    np.testing.assert_allclose([cached[t] for t in TARGETS], pred.probabilities, rtol=1e-4, atol=1e-5)


def test_predict_on_a_missing_test_study_answers_it_with_the_prior(shared_run, tiny_root, tmp_path):
    import shutil

    from cervspine.inference import load_predictor
    from cervspine.predict import predict_folder

    broken = writable_copy(tiny_root, tmp_path / "broken", ".cervspine_cache")
    victim = next((broken / "test_images").iterdir())
    shutil.rmtree(victim)
    overrides = [f"data.root={broken}", f"run_dir={shared_run.dir}", "data.image_size=64"]
    with hydra_config("predict", overrides, tmp_path / "run") as cfg:
        result = predict_folder(cfg)
    assert list(result.failed) == [victim.name] and "no study folder" in result.failed[victim.name]
    assert len(result.predictions) == 2 and len(result.predictions) - len(result.failed) == 1  # one scored
    sub = pd.read_csv(tmp_path / "run" / "submission.csv")
    assert sub["row_id"].tolist() == pd.read_csv(broken / "test.csv")["row_id"].tolist()
    rows = sub.set_index("row_id").loc[[f"{victim.name}_{t}" for t in TARGETS], "fractured"].to_numpy()
    np.testing.assert_allclose(rows, load_predictor(shared_run.dir, device="cpu").prior, rtol=1e-5)
    failures = pd.read_csv(tmp_path / "run" / "failures.csv", dtype=str)
    assert failures["StudyInstanceUID"].tolist() == [victim.name]


def test_evaluate_scores_at_the_checkpoints_image_size(shared_run, tiny_root, tmp_path):
    """No data.image_size given (the default is 256): evaluate caches and scores at the models' 64."""
    from cervspine.evaluate import evaluate

    copy = writable_copy(tiny_root, tmp_path / "labelled", ".cervspine_cache")
    overrides = [f"data.root={copy}", f"run_dir={shared_run.dir}", "fold=null", "n_bootstrap=10"]
    with hydra_config("evaluate", overrides, tmp_path / "run") as cfg:
        assert cfg.data.image_size == 256
        metrics = evaluate(cfg)
    assert sorted(p.name for p in (copy / ".cervspine_cache").iterdir()) == ["s64"]
    assert metrics["n_studies"] == 12 and np.isfinite(metrics["rsna_score"])


def test_an_ensemble_scores_the_mean_of_its_members_study_logits(shared_run, tiny_root, tiny_cache, tmp_path):
    import torch

    from cervspine.cache import CachedStudy
    from cervspine.evaluate import evaluate
    from cervspine.inference import Predictor, load_predictor

    s1, s2 = shared_run.stage1, shared_run.slice_stage2
    ckpt = load_checkpoint(s2)  # a second, different stage 2
    gen = torch.Generator().manual_seed(0)
    for k, v in ckpt["state_dict"].items():
        if k.startswith(("fracture_head", "overall_head")):
            v.add_(torch.randn(v.shape, generator=gen) * 0.5)
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    study = CachedStudy(next(p for p in sorted(tiny_cache.iterdir()) if p.is_dir()))
    a = Predictor.from_checkpoints(s1, s2, device="cpu").predict(study).probabilities.astype(np.float64)
    b = Predictor.from_checkpoints(s1, other, device="cpu").predict(study).probabilities.astype(np.float64)
    assert not np.allclose(a, b, atol=1e-3)
    ensemble = load_predictor(stage1=s1, stage2=[s2, other], device="cpu")
    assert len(ensemble.stage2) == 2 and ensemble.image_size == 64
    pred = ensemble.predict(study)
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    np.testing.assert_allclose(pred.probabilities, 1 / (1 + np.exp(-(logit(a) + logit(b)) / 2)), rtol=1e-4)
    members = pred.stage2["members"]
    assert [m["checkpoint"] for m in members] == [str(s2), str(other)]
    np.testing.assert_allclose([m["patient_overall"] for m in members], [a[-1], b[-1]], rtol=1e-5)

    overrides = [
        f"data.root={tiny_root}",
        f"run_dir={shared_run.dir}",
        f'ckpt.stage2=["{s2}","{other}"]',
        "n_bootstrap=10",
    ]
    with hydra_config("evaluate", overrides, tmp_path / "eval") as cfg:
        metrics = evaluate(cfg)
    assert metrics["stage2_ckpt"] == [str(s2), str(other)] and np.isfinite(metrics["rsna_score"])


def test_a_copied_run_folder_reads_its_own_checkpoints_not_those_at_the_recorded_path(tmp_path):
    from cervspine.runs.layout import best_checkpoint

    old, copy = tmp_path / "old" / "stage2", tmp_path / "copy" / "stage2"
    for d in (old, copy):
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "last.ckpt").write_text(d.parent.name)
    (copy / "checkpoints" / "epoch027.ckpt").write_text("copy best")
    summary = {"best_model_path": str(old / "checkpoints" / "epoch027.ckpt"),
               "last_model_path": str(old / "checkpoints" / "last.ckpt")}  # fmt: skip
    (copy / "train_summary.json").write_text(json.dumps(summary))
    assert best_checkpoint(copy) == copy / "checkpoints" / "epoch027.ckpt"
    (copy / "checkpoints" / "epoch027.ckpt").unlink()  # the old folder has last.ckpt at the recorded path
    assert best_checkpoint(copy) == copy / "checkpoints" / "last.ckpt"
