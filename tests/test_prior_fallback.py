"""Never worse than the prior: levels stage 1 does not find are answered by the training prior (flagged,
never an error), and the study calibration shrinks toward the prior on small or uninformative folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cervspine.models.safe_load import load_checkpoint
from cervspine.scoring.aggregation import fill_unlocalised, logit_mean
from cervspine.scoring.calibration import shrink, shrink_weights
from cervspine.scoring.competition import RSNA_PREVALENCE

PREMOVE = Path(__file__).parent / "data" / "premove"
PRIOR = np.array(RSNA_PREVALENCE)


def test_unlocalised_levels_take_the_prior_and_add_their_risk_to_patient_overall():
    found = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.95])
    localised = np.array([True, True, False, True, True, True, False])
    out = fill_unlocalised(found, localised, PRIOR)
    np.testing.assert_allclose(out[[2, 6]], PRIOR[[2, 6]])
    np.testing.assert_allclose(out[[0, 1, 3, 4, 5]], found[[0, 1, 3, 4, 5]])
    assert out[7] == pytest.approx(1 - (1 - 0.95) * (1 - PRIOR[2]) * (1 - PRIOR[6]))
    np.testing.assert_allclose(fill_unlocalised(found, np.zeros(7, bool), PRIOR), PRIOR)  # nothing found
    np.testing.assert_allclose(fill_unlocalised(found, np.ones(7, bool), PRIOR), found)  # all found


def _labels(n: int, rng: np.random.Generator) -> np.ndarray:
    y = (rng.random((n, 8)) < 0.2).astype(float)
    y[:, 7] = y[:, :7].max(axis=1)
    return y


def test_an_uninformative_fold_shrinks_all_the_way_to_the_prior():
    rng = np.random.default_rng(0)
    y = _labels(40, rng)
    noise = rng.random((40, 8)) * 0.98 + 0.01  # scores that know nothing of the labels
    prior = y.mean(axis=0)
    weights = shrink_weights(y, noise)
    assert weights == (1.0, 1.0)
    np.testing.assert_allclose(shrink(noise, prior, weights), np.tile(prior, (40, 1)), atol=1e-9)


def test_an_informative_fold_is_trusted_more_the_larger_it_is():
    rng = np.random.default_rng(1)
    weights = {}
    for n in (12, 200):
        y = _labels(n, rng)
        good = np.clip(0.8 * y + 0.1 + 0.05 * rng.random((n, 8)), 0.01, 0.99)
        weights[n] = shrink_weights(y, good)
        assert all(w < 1.0 for w in weights[n])
    assert weights[12][0] == pytest.approx(3 / 15) and weights[200][0] == pytest.approx(3 / 203)


@pytest.fixture(scope="module")
def blind_stage1(tmp_path_factory) -> Path:
    """The tiny pre-move stage 1 made blind: its presence logits pushed to -30 (it finds nothing)."""
    ckpt = load_checkpoint(PREMOVE / "stage1.ckpt")
    ckpt["state_dict"]["presence_head.bias"].fill_(-30.0)
    path = tmp_path_factory.mktemp("blind") / "stage1_blind.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("members", [["slice"], ["sequence"], ["slice", "sequence"]])
def test_a_study_stage1_cannot_localise_gets_the_prior_and_a_flag(blind_stage1, members):
    from cervspine.cache import CachedStudy
    from cervspine.inference import Predictor

    predictor = Predictor.from_checkpoints(
        blind_stage1, [PREMOVE / f"{m}.ckpt" for m in members], device="cpu"
    )
    pred = predictor.predict(CachedStudy(PREMOVE / "study"))
    assert pred.not_localised == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    priors = np.stack([m.model.training_prior() for m in predictor.stage2])
    np.testing.assert_allclose(pred.probabilities, logit_mean(priors), atol=1e-4)  # the members' prior
    record = pred.as_dict()
    assert record["not_localised"] == pred.not_localised and "level not localised" in record["fallback"]


def test_a_single_study_predict_answers_an_unlocalisable_study_in_json_and_html(blind_stage1, tmp_path):
    """No RuntimeError: the study gets the prior, "level not localised" in its JSON and its HTML page."""
    import json

    from cervspine.cache import CachedStudy
    from cervspine.inference import Predictor
    from cervspine.jobs.predict import study_record
    from cervspine.report.study import write_study_report

    predictor = Predictor.from_checkpoints(blind_stage1, [PREMOVE / "slice.ckpt"], device="cpu")
    study = CachedStudy(PREMOVE / "study")
    pred = predictor.predict(study)
    record = json.loads(json.dumps(study_record(pred)))
    assert record["not_localised"] == list(pred.not_localised) and len(record["not_localised"]) == 7
    assert "level not localised" in record["fallback"]
    page = write_study_report(tmp_path, study, pred, predictor, synthetic=True).html.read_text()
    assert "Level not localised" in page and "C1, C2, C3, C4, C5, C6, C7" in page


def test_with_a_blind_stage1_the_pipeline_scores_the_prior_and_writes_its_submission(
    shared_run, tiny_root, tmp_path
):
    """The trained run's stage 1 made blind: the evaluate step's score is the prior's ± 0.02 (each level
    falls back to the training prior, the patient level to the risk of the seven), and predict still
    writes a submission row for every test study and level."""
    import pandas as pd

    from cervspine.evaluate import evaluate
    from cervspine.predict import predict_folder
    from tests.helpers import hydra_config

    ckpt = load_checkpoint(shared_run.stage1)
    ckpt["state_dict"]["presence_head.bias"].fill_(-30.0)
    blind = tmp_path / "stage1_blind.ckpt"
    torch.save(ckpt, blind)
    common = [f"data.root={tiny_root}", f"run_dir={shared_run.dir}", f"ckpt.stage1={blind}",
              f"ckpt.stage2={shared_run.slice_stage2}"]  # fmt: skip
    with hydra_config("evaluate", [*common, "fold=null", "n_bootstrap=10"], tmp_path / "eval") as cfg:
        metrics = evaluate(cfg)
    assert metrics["n_studies"] >= 10
    assert abs(metrics["rsna_score"] - metrics["prior_baseline_rsna_score"]) <= 0.02, metrics
    with hydra_config("predict", [*common, "data.image_size=64"], tmp_path / "predict") as cfg:
        result = predict_folder(cfg)
    assert not result.failed
    submission = pd.read_csv(result.submission)
    n_test = len(pd.read_csv(tiny_root / "test.csv").StudyInstanceUID.unique())
    assert len(submission) == 8 * n_test and submission.fractured.between(0, 1).all()
