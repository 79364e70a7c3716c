"""The competition metric, baselines, the classification report and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cervspine import TARGETS, VERTEBRAE
from cervspine.scoring.metrics import (
    bootstrap_ci,
    classification_report,
    flatten_report,
    paired_bootstrap_difference,
    prior_baseline,
    rsna_score,
    study_losses,
)


def _random_case(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vert = (rng.random((n, 7)) < 0.2).astype(float)
    y = np.column_stack([vert, vert.max(axis=1)])
    p = np.clip(0.6 * y + 0.4 * rng.random(y.shape), 0, 1)
    return y, p


def test_one_study_by_hand() -> None:
    y = np.array([[1, 0, 0, 0, 0, 0, 0, 1]])
    p = np.array([[0.8, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1, 0.7]])
    # weights: C1 positive 2, C2..C7 negative 1, patient_overall positive 14 → Σw = 2 + 6 + 14 = 22
    numerator = (
        2 * -np.log(0.8)  # C1, y=1
        + -np.log(1 - 0.1)  # C2
        + -np.log(1 - 0.2)  # C3
        + 4 * -np.log(1 - 0.1)  # C4..C7
        + 14 * -np.log(0.7)  # patient_overall, y=1
    )
    assert rsna_score(y, p) == pytest.approx(numerator / 22, rel=1e-12)


def test_per_study_normalisation_differs_from_global_weighted_mean() -> None:
    y = np.array([[0] * 8, [1] * 8])
    p = np.full((2, 8), 0.1)
    loss_a, loss_b = -np.log(0.9), -np.log(0.1)  # every element of a study has the same loss
    per_study = (loss_a + loss_b) / 2
    w_a, w_b = 7 * 1 + 7, 7 * 2 + 14  # Σw: negatives 1 and 7; positives 2 and 14
    global_mean = (w_a * loss_a + w_b * loss_b) / (w_a + w_b)
    assert rsna_score(y, p) == pytest.approx(per_study, rel=1e-12)
    assert not math.isclose(per_study, global_mean, rel_tol=1e-3)
    np.testing.assert_allclose(study_losses(y, p), [loss_a, loss_b], rtol=1e-12)


def test_perfect_and_constant_half() -> None:
    y, _ = _random_case()
    assert rsna_score(y, y) < 1e-6
    assert rsna_score(y, np.full(y.shape, 0.5)) == pytest.approx(math.log(2), rel=1e-12)


def test_predictions_are_clipped() -> None:
    y = np.ones((1, 8))
    assert rsna_score(y, np.zeros((1, 8))) == pytest.approx(-math.log(1e-7), rel=1e-9)
    assert rsna_score(y, np.zeros((1, 8)), eps=1e-3) == pytest.approx(-math.log(1e-3), rel=1e-9)
    assert rsna_score(1 - y, np.ones((1, 8))) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_accepts_tensors_and_lists() -> None:
    y, p = _random_case(5)
    expected = rsna_score(y, p)
    assert rsna_score(torch.tensor(y), torch.tensor(p)) == pytest.approx(expected)
    assert rsna_score(y.tolist(), p.tolist()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        (np.zeros((3, 7)), np.zeros((3, 7)), "shape"),
        (np.zeros(8), np.zeros(8), "shape"),
        (np.zeros((3, 8)), np.zeros((2, 8)), "differ"),
        (np.zeros((0, 8)), np.zeros((0, 8)), "no studies"),
        (np.full((1, 8), 0.5), np.zeros((1, 8)), "only 0 and 1"),
        (np.full((1, 8), np.nan), np.zeros((1, 8)), "NaN"),
        (np.zeros((1, 8)), np.full((1, 8), np.nan), "NaN"),
        (np.zeros((1, 8)), np.full((1, 8), 1.5), r"\[0, 1\]"),
    ],
)
def test_invalid_inputs(y: np.ndarray, p: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rsna_score(y, p)


def test_prior_baseline() -> None:
    y = np.zeros((4, 8))
    y[:2, 0] = 1  # C1 prevalence 0.5
    y[:2, 7] = 1
    prior = prior_baseline(y)
    assert prior.shape == (8,)
    assert prior[0] == pytest.approx(0.5)
    assert prior[1] == pytest.approx(1e-3)  # never positive → clipped
    # optimal: positive C1 (2 studies) carries share 2/22 of its study's Σw, negative C1 1/14 (Σw = 7 + 7)
    optimal = prior_baseline(y, optimal=True)
    assert optimal[0] == pytest.approx((2 * 2 / 22) / (2 * 2 / 22 + 2 * 1 / 14))
    best = rsna_score(y, np.tile(optimal, (4, 1)))
    assert best < rsna_score(y, np.tile(prior, (4, 1)))
    for delta in (-0.01, 0.01):  # a minimum: nudging C1 either way costs
        nudged = optimal.copy()
        nudged[0] += delta
        assert rsna_score(y, np.tile(nudged, (4, 1))) > best


def test_classification_report_by_hand() -> None:
    y = np.zeros((4, 8))
    y[:, 0] = [0, 0, 1, 1]
    y[:, 7] = y[:, 0]
    p = np.full((4, 8), 0.2)
    p[:, 0] = [0.1, 0.6, 0.4, 0.9]
    report = classification_report(y, p)
    c1 = report["C1"]
    # thresholded [0, 1, 0, 1]: TP 1, FP 1, FN 1, TN 1
    assert c1["accuracy"] == pytest.approx(0.5)
    assert c1["precision"] == pytest.approx(0.5)
    assert c1["recall"] == pytest.approx(0.5)
    assert c1["f1"] == pytest.approx(0.5)
    assert c1["auroc"] == pytest.approx(0.75)  # 3 of the 4 (neg, pos) pairs ordered correctly
    assert math.isnan(report["C2"]["auroc"])  # one class only
    assert report["macro"]["auroc"] == pytest.approx(0.75)  # NaNs ignored
    assert report["macro"]["accuracy"] == pytest.approx((0.5 + 6 * 1.0) / 7)
    assert report["rsna_score"] == pytest.approx(rsna_score(y, p))
    assert set(report) == {*TARGETS, "macro", "rsna_score"}
    flat = flatten_report(report, prefix="val/")
    assert flat["val/C1/auroc"] == pytest.approx(0.75)
    assert flat["val/rsna_score"] == pytest.approx(report["rsna_score"])
    assert len(VERTEBRAE) == 7


def test_the_paired_bootstrap_brackets_the_difference_and_tells_a_better_model_from_noise() -> None:
    y, p = _random_case(60)
    better = np.clip(0.7 * p + 0.3 * y, 0.01, 0.99)
    diff, low, high = paired_bootstrap_difference(y, p, better, n=300, seed=2)
    assert diff == pytest.approx(rsna_score(y, better) - rsna_score(y, p))
    assert low <= diff <= high < 0  # moving toward the labels lowers the loss on (nearly) every resample
    same = paired_bootstrap_difference(y, p, p, n=50)
    assert same == (0.0, 0.0, 0.0)
    noisy = np.clip(p + np.random.default_rng(3).normal(0, 0.02, p.shape), 0.01, 0.99)
    _, low, high = paired_bootstrap_difference(y, p, noisy, n=300)
    assert low < 0 < high  # a small random jitter is not a difference the studies can show
    with pytest.raises(ValueError, match="n must be"):
        paired_bootstrap_difference(y, p, p, n=0)


def test_bootstrap_ci() -> None:
    y, p = _random_case(30)
    low, high = bootstrap_ci(y, p, rsna_score, n=200, seed=1)
    assert low <= rsna_score(y, p) <= high
    assert (low, high) == bootstrap_ci(y, p, rsna_score, n=200, seed=1)
    narrow = bootstrap_ci(y, p, rsna_score, n=200, seed=1, alpha=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    with pytest.raises(ValueError, match="n must be"):
        bootstrap_ci(y, p, rsna_score, n=0)
    with pytest.raises(ValueError, match="same"):
        bootstrap_ci(y, p[:3], rsna_score)
