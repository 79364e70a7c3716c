"""A study's answer: stage 1 once, then each stage-2 model; several stage-2 models are an ensemble whose
answer is the mean of their study logits."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cervspine.cache import CachedStudy
from cervspine.inference.runtime import Runtime
from cervspine.inference.stage1 import Stage1, load_stage1
from cervspine.inference.stage2 import Stage2, load_stage2
from cervspine.runs.layout import stage_checkpoints
from cervspine.scoring.answer import (  # noqa: F401  (StudyPrediction, ENSEMBLE_RULE: re-exported)
    ENSEMBLE_RULE,
    StudyPrediction,
    combine_members,
    ensemble_prior,
)


class Predictor:
    """Stage 1 and one or more stage-2 strategies (:mod:`cervspine.inference.stage2`), ready to score."""

    def __init__(self, stage1: Stage1, stage2: Sequence[Stage2], runtime: Runtime):
        self.stage1, self.stage2, self.runtime = stage1, list(stage2), runtime
        if not self.stage2:
            raise ValueError("a Predictor needs at least one stage-2 model")
        for member in self.stage2:
            if member.image_size != stage1.image_size:
                raise ValueError(
                    f"stage 1 ({stage1.checkpoint}) and stage 2 ({member.checkpoint}) were trained on caches "
                    f"of different image_size: {stage1.image_size} vs {member.image_size}"
                )

    @classmethod
    def from_checkpoints(
        cls,
        stage1: str | Path,
        stage2: str | Path | Sequence[str | Path],
        *,
        aggregation: dict[str, Any] | None = None,
        **runtime: Any,
    ) -> Predictor:
        """``runtime``: :meth:`Runtime.create`'s options; ``aggregation`` replaces the slice model's own
        (its study calibration then no longer applies)."""
        rt = Runtime.create(**runtime)
        paths = [stage2] if isinstance(stage2, (str, Path)) else list(stage2)
        members = [load_stage2(p, rt, aggregation=aggregation) for p in paths]
        return cls(load_stage1(stage1, rt), members, rt)

    @property
    def image_size(self) -> int | None:
        """The cache image size the stages were trained on (studies must be cached at this size)."""
        return self.stage1.image_size

    @property
    def checkpoints(self) -> list[Path]:
        return [m.checkpoint for m in self.stage2]

    @property
    def prior(self) -> np.ndarray:
        """(8,) the answer known without looking (the members' training priors, combined)."""
        return ensemble_prior([m.prior for m in self.stage2])

    def predict(self, study: CachedStudy) -> StudyPrediction:
        study = study.loaded()  # a compressed entry decoded once for all stages
        with self.runtime.threads():
            t0 = time.perf_counter()
            s1 = self.stage1.run(study)
            t1 = time.perf_counter() - t0
            results, t2, agg = [], 0.0, 0.0
            for member in self.stage2:
                t0 = time.perf_counter()
                results.append(member.score(member.inputs(study, s1)))
                t2 += time.perf_counter() - t0 - results[-1].aggregate_s
                agg += results[-1].aggregate_s
        timings = {"stage1": t1, "stage2": t2, "aggregate": agg}
        return combine_members(study, s1, results, [m.checkpoint for m in self.stage2], timings)


def load_predictor(
    run_dir: str | Path | None = None,
    stage1: str | Path | None = None,
    stage2: str | Path | Sequence[str | Path] | None = None,
    *,
    aggregation: dict[str, Any] | None = None,
    **runtime: Any,
) -> Predictor:
    """The predictor a config describes (``conf/predictor/default.yaml``): explicit checkpoints win, else
    the best ones of the pipeline run ``run_dir`` (stage 2 and any ``stage2_<name>/`` ensemble members)."""
    s1, s2 = stage_checkpoints(run_dir, stage1, stage2)
    return Predictor.from_checkpoints(s1, s2, aggregation=aggregation, **runtime)
