"""Study-level Platt calibration: what it fits, that cross-fitting never sees a study's own label."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cervspine.scoring.calibration import IDENTITY, StudyCalibration, cross_fitted, fit_platt
from cervspine.scoring.metrics import classification_report, rsna_score


def _draw(n: int, seed: int = 0, squash: float = 1.0, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities q; predictions p = σ((logit q − shift) / squash)."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.02, 0.98, size=(n, 8))
    y = (rng.random((n, 8)) < q).astype(float)
    z = (np.log(q) - np.log1p(-q) - shift) / squash
    return y, 1 / (1 + np.exp(-z))


def test_platt_recovers_the_weighted_optimum_of_calibrated_probabilities():
    # positives weigh twice: the weighted log loss is minimised by 2q/(1+q), i.e. logit q + log 2
    y, p = _draw(20000)
    a_v, b_v, a_o, b_o = StudyCalibration.fit(y, p, ridge=0.0).params
    assert a_v == pytest.approx(1.0, abs=0.05) and b_v == pytest.approx(math.log(2), abs=0.05)
    assert a_o == pytest.approx(1.0, abs=0.1) and b_o == pytest.approx(math.log(2), abs=0.1)


def test_platt_undoes_overconfident_and_shifted_predictions():
    y, p = _draw(5000, seed=1, squash=0.3, shift=-2.0)  # far too confident and far too high
    a, b = fit_platt(y.ravel(), p.ravel(), np.ones(y.size), ridge=0.0)
    assert a == pytest.approx(0.3, abs=0.03)  # the squash comes back out
    cal = StudyCalibration.fit(y, p)
    assert rsna_score(y, cal(p)) < 0.8 * rsna_score(y, p)


def test_calibration_keeps_the_ranking():
    y, p = _draw(300, seed=2, squash=0.5, shift=1.0)
    cal = StudyCalibration.fit(y, p)
    before, after = classification_report(y, p), classification_report(y, cal(p))
    for t in ("C1", "C7", "patient_overall"):
        assert after[t]["auroc"] == pytest.approx(before[t]["auroc"], abs=1e-9)


def test_identity_is_a_no_op_and_fit_checks_shapes():
    _, p = _draw(10)
    assert StudyCalibration(IDENTITY).is_identity
    np.testing.assert_array_equal(StudyCalibration()(p), p)
    with pytest.raises(ValueError, match="n_studies, 8"):
        StudyCalibration.fit(np.zeros((4, 7)), np.zeros((4, 7)))


def test_cross_fitted_prediction_ignores_the_study_s_own_label():
    y, p = _draw(40, seed=3, squash=0.5)
    base = cross_fitted(y, p, folds=5, seed=0)
    flipped = y.copy()
    flipped[7] = 1 - flipped[7]
    again = cross_fitted(flipped, p, folds=5, seed=0)
    np.testing.assert_allclose(again[7], base[7])  # study 7's own prediction did not move
    assert not np.allclose(again, base)  # but the other folds' calibrations did


def test_calibrated_patient_overall_is_never_below_a_level():
    from cervspine.scoring.calibration import calibrate_study, coherent_overall

    p = np.array([[0.02, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.3], [0.1] * 7 + [0.8]])
    out = coherent_overall(p)
    assert out[0, 7] == 0.9 and out[1, 7] == 0.8  # raised where below the likeliest level, else kept
    np.testing.assert_array_equal(out[:, :7], p[:, :7])
    # levels and overall calibrated by different maps: low raw scores cross without the rule
    raw = np.array([[0.05] * 7 + [0.05]])
    prior = np.full(8, 0.2)
    cal = calibrate_study(raw, (1.0, 1.0, 3.0, 0.0), (0.0, 0.0), prior)[0]
    assert cal[7] >= cal[:7].max() - 1e-12 and cal[:7].max() > 0.1
