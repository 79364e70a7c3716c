"""The run's operating point: chosen on the validation fold (sensitivity target by default, specificity
target or Youden as options) with bootstrap intervals, saved as operating_point.json by evaluate, used by
predict (JSON, HTML) and stated in the model card."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cervspine import TARGETS


def _labels(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < 0.3).astype(np.float64)
    y[:, 7] = y[:, :7].max(axis=1)
    return y, np.clip(0.35 * y + 0.65 * rng.random((n, 8)), 0, 1)


def _sens(y, p, t):
    y, pred = np.asarray(y, bool).ravel(), np.asarray(p).ravel() > t
    return pred[y].mean()


def _spec(y, p, t):
    y, pred = np.asarray(y, bool).ravel(), np.asarray(p).ravel() > t
    return (~pred[~y]).mean()


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_sensitivity_target_is_the_highest_threshold_that_reaches_it(target):
    from cervspine.scoring.thresholds import target_threshold

    y, p = _labels(seed=1)
    t = target_threshold(y[:, 7], p[:, 7], "sensitivity", target)
    assert _sens(y[:, 7], p[:, 7], t) >= target
    higher = np.sort(p[:, 7][p[:, 7] > t])[0]  # the next cut up makes one more positive study negative
    assert _sens(y[:, 7], p[:, 7], (higher + np.sort(p[:, 7][p[:, 7] > higher])[0]) / 2) < target
    assert not np.isclose(p[:, 7], t).any()  # between two scores: > and >= agree


def test_specificity_target_is_the_lowest_threshold_that_reaches_it():
    from cervspine.scoring.thresholds import target_threshold

    y, p = _labels(seed=2)
    t = target_threshold(y[:, 7], p[:, 7], "specificity", 0.9)
    assert _spec(y[:, 7], p[:, 7], t) >= 0.9
    lower = np.sort(p[:, 7][p[:, 7] < t])[-1]
    assert _spec(y[:, 7], p[:, 7], lower - 1e-9) < 0.9
    # a target no threshold below the top score reaches: nothing is positive
    assert _spec(y[:, 7], p[:, 7], target_threshold(y[:, 7], p[:, 7], "specificity", 1.0)) == 1.0


def test_youden_rule_and_bad_rules():
    from cervspine.scoring.thresholds import target_threshold, youden_threshold

    y, p = _labels(seed=3)
    assert target_threshold(y[:, 0], p[:, 0], "youden") == youden_threshold(y[:, 0], p[:, 0])
    with pytest.raises(ValueError, match="rule must be one of"):
        target_threshold(y[:, 0], p[:, 0], "f1", 0.9)
    with pytest.raises(ValueError, match="target must be in"):
        target_threshold(y[:, 0], p[:, 0], "sensitivity", 1.5)
    assert target_threshold(np.ones(4), np.linspace(0, 1, 4), "sensitivity", 0.9) == 0.5  # one class


def test_operating_point_pools_the_vertebrae_and_gives_intervals_that_hold_the_estimate():
    from cervspine.scoring.thresholds import OperatingPoint, choose_operating_point, target_threshold

    y, p = _labels(seed=4)
    op = choose_operating_point(y, p, "sensitivity", 0.9, n_boot=300)
    assert op.patient.threshold == target_threshold(y[:, 7], p[:, 7], "sensitivity", 0.9)
    assert op.vertebra.threshold == target_threshold(y[:, :7], p[:, :7], "sensitivity", 0.9)
    assert op.vertebra.n_positive == int(y[:, :7].sum()) and op.patient.n_negative == int(
        (y[:, 7] == 0).sum()
    )
    for lv, yy, pp in ((op.patient, y[:, 7], p[:, 7]), (op.vertebra, y[:, :7], p[:, :7])):
        assert lv.sensitivity == pytest.approx(_sens(yy, pp, lv.threshold)) and lv.sensitivity >= 0.9
        assert lv.specificity == pytest.approx(_spec(yy, pp, lv.threshold))
        for value, (lo, hi) in ((lv.sensitivity, lv.sensitivity_ci95), (lv.specificity, lv.specificity_ci95)):
            assert lo <= value <= hi and hi - lo > 0.01
    back = OperatingPoint.from_dict(json.loads(json.dumps(op.as_dict())))
    assert back == op and back.thresholds().per_target().tolist() == [op.vertebra.threshold] * 7 + [
        op.patient.threshold
    ]
    spec = choose_operating_point(y, p, "specificity", 0.95, n_boot=0)
    assert spec.patient.specificity >= 0.95 and np.isnan(spec.patient.sensitivity_ci95[0])  # no bootstrap
    assert choose_operating_point(y, p, "youden").target is None


def test_the_pipeline_run_has_its_operating_point_everywhere(shared_run):
    """evaluate (the pipeline's step) wrote operating_point.json on the validation fold; the predict
    step's study records and reports use it; metrics.json and the model card state it."""
    from cervspine.jobs.operating_point import load_operating_point

    run = shared_run.dir
    op = load_operating_point(run)
    assert op.rule == "sensitivity" and op.target == 0.9
    assert op.provenance["chosen_on"].startswith("validation fold")
    assert json.loads((run / "metrics.json").read_text())["operating_point"]["patient"]["threshold"] == (
        op.patient.threshold
    )
    records = sorted((run / "studies").glob("*.json"))
    assert records
    for path in records:
        rec = json.loads(path.read_text())
        assert rec["operating_point"]["patient"] == op.patient.threshold
        calls = rec["operating_point"]["fracture_suspected"]
        assert calls == {t: rec[t] > op.thresholds().per_target()[j] for j, t in enumerate(TARGETS)}
    page = next((run / "study_reports").glob("*/report.html")).read_text()
    assert f"p &gt; {op.patient.threshold:.3f} (patient)" in page and "sensitivity ≥ 0.9" in page
    card = (run / "MODEL_CARD.md").read_text()
    assert "## Operating point" in card and f"{op.patient.threshold:.4f}" in card
    assert f"{op.patient.sensitivity:.3f} ({op.patient.sensitivity_ci95[0]:.2f}" in card


def test_predict_uses_a_given_operating_point_and_report_threshold_overrides_it(
    shared_run, tiny_root, tmp_path
):
    from cervspine.jobs.predict import predict_study_folder
    from cervspine.scoring.thresholds import choose_operating_point
    from tests.helpers import hydra_config

    y, p = _labels(seed=5)
    op = choose_operating_point(y, p, "specificity", 0.8, n_boot=20)
    (tmp_path / "op.json").write_text(json.dumps(op.as_dict()))
    study = next((tiny_root / "test_images").iterdir())
    base = [f"study={study}", f"run_dir={shared_run.dir}"]
    with hydra_config("predict", [*base, f"operating_point={tmp_path / 'op.json'}"], tmp_path / "a") as cfg:
        predict_study_folder(cfg)
    rec = json.loads((tmp_path / "a" / "studies" / f"{study.name}.json").read_text())
    assert (
        rec["operating_point"]["patient"] == op.patient.threshold
        and "specificity" in rec["operating_point"]["rule"]
    )
    from cervspine.jobs.operating_point import resolve_thresholds

    with hydra_config("predict", [*base, "report_threshold=0.5"], tmp_path / "b") as cfg:
        given, from_run = resolve_thresholds(cfg)
    assert given.patient == given.vertebra == 0.5 and given.rule.startswith("given") and from_run is None
    with hydra_config("predict", base, tmp_path / "b") as cfg:  # neither given: the run's own
        run_op = json.loads((shared_run.dir / "operating_point.json").read_text())
        assert resolve_thresholds(cfg)[1].patient.threshold == run_op["patient"]["threshold"]
    missing = [*base, f"operating_point={tmp_path / 'nope.json'}"]
    with (
        hydra_config("predict", missing, tmp_path / "c") as cfg,
        pytest.raises(FileNotFoundError, match="nope"),
    ):
        predict_study_folder(cfg)
