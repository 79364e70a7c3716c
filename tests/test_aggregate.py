"""Slice → study aggregation: values, properties, the table interface."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cervspine import TARGETS
from cervspine.scoring.aggregation import (
    AGGREGATORS,
    DEFAULT_EPS,
    P_COLUMNS,
    VIS_COLUMNS,
    aggregate_study,
    aggregate_table,
    register_aggregator,
    topk_mean,
    visibility_weighted_mean,
)

METHODS = sorted(AGGREGATORS)
PROPERTY = settings(max_examples=40, deadline=None)
unit = st.floats(0.0, 1.0, allow_nan=False, width=64)


@st.composite
def study(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 12))
    p = draw(arrays(np.float64, (n, 7), elements=unit))
    vis = draw(arrays(np.float64, (n, 7), elements=unit | st.sampled_from([0.0, 1.0])))
    return p, vis


@PROPERTY
@given(study(), st.sampled_from(METHODS), st.sampled_from(["noisy_or", "max"]))
def test_output_bounded(case: tuple[np.ndarray, np.ndarray], method: str, overall: str) -> None:
    out = aggregate_study(*case, method=method, overall=overall)
    assert out.shape == (8,)
    assert np.all((out >= DEFAULT_EPS) & (out <= 1 - DEFAULT_EPS))
    assert np.all((out > 0) & (out < 1))


@PROPERTY
@given(study(), st.sampled_from(METHODS), st.data())
def test_monotone_in_slice_probability(
    case: tuple[np.ndarray, np.ndarray], method: str, data: st.DataObject
) -> None:
    p, vis = case
    s = data.draw(st.integers(0, p.shape[0] - 1))
    v = data.draw(st.integers(0, 6))
    raised = p.copy()
    raised[s, v] = data.draw(st.floats(p[s, v], 1.0))
    before = aggregate_study(p, vis, method=method)
    after = aggregate_study(raised, vis, method=method)
    assert np.all(after >= before - 1e-12)


@PROPERTY
@given(study(), st.sampled_from(METHODS), st.randoms(use_true_random=False))
def test_invariant_to_slice_order(case: tuple[np.ndarray, np.ndarray], method: str, rnd) -> None:
    p, vis = case
    order = list(range(p.shape[0]))
    rnd.shuffle(order)
    np.testing.assert_allclose(
        aggregate_study(p[order], vis[order], method=method),
        aggregate_study(p, vis, method=method),
        atol=1e-12,
    )


@PROPERTY
@given(study(), st.sampled_from(METHODS))
def test_noisy_or_at_least_max(case: tuple[np.ndarray, np.ndarray], method: str) -> None:
    out = aggregate_study(*case, method=method, overall="noisy_or")
    assert out[7] >= out[:7].max()
    assert aggregate_study(*case, method=method, overall="max")[7] == pytest.approx(out[:7].max())


def test_single_positive_slice_ranks_higher_under_topk() -> None:
    p = np.full((20, 7), 0.05)
    p[10, 3] = 0.95
    vis = np.ones_like(p)
    topk = aggregate_study(p, vis, method="topk_mean", k=5)
    mean = aggregate_study(p, vis, method="visibility_mean")
    assert topk[3] == pytest.approx((0.95 + 4 * 0.05) / 5)
    assert mean[3] == pytest.approx((0.95 + 19 * 0.05) / 20)
    assert topk[3] > mean[3]


def test_visibility_weighted_mean_by_hand() -> None:
    p = np.tile(np.array([[0.2], [0.8]]), (1, 7))
    vis = np.zeros_like(p)
    vis[:, 0] = [1.0, 0.5]  # C1: (1*0.2 + 0.5*0.8) / 1.5 = 0.4; C2..C7 never visible
    out = visibility_weighted_mean(p, vis, fallback=0.1)
    assert out[0] == pytest.approx(0.4)
    np.testing.assert_allclose(out[1:], 0.1)
    prior = np.linspace(0.1, 0.7, 7)
    np.testing.assert_allclose(visibility_weighted_mean(p, vis, fallback=prior)[1:], prior[1:])


def test_topk_hard_and_soft_branches() -> None:
    p = np.linspace(0.0, 0.9, 10)[:, None].repeat(7, axis=1)
    vis = np.zeros_like(p)
    vis[:, 0] = 1.0  # 10 visible slices: plain top-3 mean
    vis[:, 1] = 0.4  # none passes the threshold: soft top-2 over mass 0.4 each → top 5 slices
    vis[:2, 2] = 1.0  # 2 visible < k: soft top-3 over the whole mass 2 → mean of those slices
    out = topk_mean(p, vis, k=3, threshold=0.5, fallback=0.0)
    assert out[0] == pytest.approx(np.mean([0.9, 0.8, 0.7]))
    out2 = topk_mean(p, vis, k=2, threshold=0.5)
    assert out2[1] == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.6, 0.5]))
    assert out[2] == pytest.approx(np.mean([0.0, 0.1]))
    assert out[3] == 0.0  # never visible → fallback
    with pytest.raises(ValueError, match="k must"):
        topk_mean(p, vis, k=0)


def test_aggregate_study_errors_and_defaults() -> None:
    p = np.full((3, 7), 0.3)
    np.testing.assert_allclose(aggregate_study(p)[:7], 0.3)  # visibility None: all visible
    with pytest.raises(ValueError, match="unknown aggregation method"):
        aggregate_study(p, method="nope")
    with pytest.raises(ValueError, match="unknown overall"):
        aggregate_study(p, overall="nope")
    with pytest.raises(ValueError, match="shape"):
        aggregate_study(np.zeros((3, 6)))
    with pytest.raises(ValueError, match="differ"):
        aggregate_study(p, np.ones((2, 7)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aggregate_study(p + 1)
    with pytest.raises(ValueError, match="finite"):
        aggregate_study(p, np.full((3, 7), np.nan))


def test_register_aggregator() -> None:
    @register_aggregator("test_min")
    def _min(p: np.ndarray, vis: np.ndarray) -> np.ndarray:
        return p.min(axis=0)

    try:
        np.testing.assert_allclose(
            aggregate_study(np.array([[0.2] * 7, [0.6] * 7]), method="test_min")[:7], 0.2
        )
        with pytest.raises(ValueError, match="already"):
            register_aggregator("test_min")(_min)
    finally:
        AGGREGATORS.pop("test_min")


def _long_table(rng: np.random.Generator) -> pd.DataFrame:
    frames = []
    for uid, n in (("1.2.9", 4), ("1.2.10", 6)):
        frame = pd.DataFrame(rng.random((n, 7)), columns=list(P_COLUMNS))
        frame[list(VIS_COLUMNS)] = rng.random((n, 7))
        frame.insert(0, "slice_index", np.arange(n))
        frame.insert(0, "StudyInstanceUID", uid)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_aggregate_table_matches_aggregate_study() -> None:
    df = _long_table(np.random.default_rng(0))
    out = aggregate_table(df, method="topk_mean", k=2)
    assert list(out.columns) == ["StudyInstanceUID", *TARGETS]
    assert out["StudyInstanceUID"].tolist() == ["1.2.9", "1.2.10"]  # first-appearance order
    for row, (_, group) in zip(out.itertuples(index=False), df.groupby("StudyInstanceUID", sort=False)):
        expected = aggregate_study(
            group[list(P_COLUMNS)].to_numpy(), group[list(VIS_COLUMNS)].to_numpy(), k=2
        )
        np.testing.assert_allclose(np.asarray(row[1:], dtype=float), expected)
    no_vis = aggregate_table(df.drop(columns=list(VIS_COLUMNS)), method="visibility_mean")
    means = df.groupby("StudyInstanceUID", sort=False)[list(P_COLUMNS)].mean().to_numpy()
    np.testing.assert_allclose(no_vis[list(TARGETS[:7])].to_numpy(), means)


def test_aggregate_table_missing_columns() -> None:
    df = _long_table(np.random.default_rng(1))
    with pytest.raises(ValueError, match="p_C3"):
        aggregate_table(df.drop(columns=["p_C3"]))
    with pytest.raises(ValueError, match="vis_C1"):
        aggregate_table(df.drop(columns=["vis_C1"]))
