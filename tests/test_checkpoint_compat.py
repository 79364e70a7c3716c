"""Checkpoints written before the house restructuring (commit 31883b1, tests/data/premove/) still load and
give the same answers: stage 1, the slice classifier, the sequence model and their ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data" / "premove"


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((DATA / "expected.json").read_text())


@pytest.fixture(scope="module")
def study():
    from cervspine.cache import CachedStudy

    return CachedStudy(DATA / "study")


def test_premove_stage1_gives_the_same_visibility(expected, study):
    from cervspine.inference import Runtime, load_stage1

    stage1 = load_stage1(DATA / "stage1.ckpt", Runtime.create("cpu"))
    assert stage1.kind == "slice"  # no model_class recorded then: the per-slice detector
    out = stage1.run(study)
    np.testing.assert_allclose(out.visibility, np.array(expected["stage1_vis"]), rtol=0, atol=1e-6)
    boxes = np.nan_to_num(out.boxes, nan=-1)
    np.testing.assert_allclose(boxes, np.array(expected["stage1_boxes"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "members"),
    [("slice", ["slice"]), ("sequence", ["sequence"]), ("ensemble", ["slice", "sequence"])],
)
def test_premove_stage2_models_give_the_same_probabilities(expected, study, name, members):
    from cervspine.inference import Predictor

    stage2 = [DATA / f"{m}.ckpt" for m in members]
    predictor = Predictor.from_checkpoints(DATA / "stage1.ckpt", stage2, device="cpu")
    assert [m.kind for m in predictor.stage2] == members
    probs = predictor.predict(study).probabilities
    np.testing.assert_allclose(probs, since_premove(expected, name), rtol=0, atol=1e-6)


def since_premove(expected: dict, name: str) -> np.ndarray:
    """The recorded answers with the one change made on purpose since: the slice model's patient_overall
    is kept at least its likeliest level's (``coherent_overall``; the premove slice answer had 0.008 under
    a level's 0.063). The sequence model's noisy-or is so already; the ensemble is the members' logit mean."""
    from cervspine.scoring.aggregation import logit_mean
    from cervspine.scoring.calibration import coherent_overall

    slice_now, sequence = coherent_overall(np.array(expected["slice"])), np.array(expected["sequence"])
    np.testing.assert_array_equal(coherent_overall(sequence), sequence)
    return {
        "slice": slice_now,
        "sequence": sequence,
        "ensemble": logit_mean(np.stack([slice_now, sequence])),
    }[name]
