"""Stage 2 at inference: a protocol that every stage-2 model's strategy follows, and the registry that
picks the strategy a checkpoint needs.

A strategy turns a study and its stage-1 output into model inputs (:meth:`Stage2.inputs`), scores them
into the 8 study probabilities (:meth:`Stage2.score`), and may explain a few slices for the reports
(:meth:`Stage2.explain`). New stage-2 models join with :func:`register_stage2`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cervspine.cache import CachedStudy
from cervspine.inference.checkpoints import model_class_name, read_checkpoint
from cervspine.inference.runtime import Runtime
from cervspine.inference.stage1 import Stage1Output
from cervspine.scoring.answer import Stage2Result  # noqa: F401  (re-exported: its home before)


@dataclass
class Explanation:
    """Saliency of a few slices: ``images`` (n, C, S, S) as the model saw them, ``cams`` (n, S, S) in
    [0, 1], the ``layer`` the maps come from, each slice's pixel ``crops`` (y0, x0, y1, x1) in the cached
    slice, and ``display_channel``: the channel of ``images`` to show (window 0's middle slice)."""

    images: np.ndarray
    cams: np.ndarray
    layer: str
    crops: list[tuple[int, int, int, int]]
    display_channel: int


class Stage2(Protocol):
    """What the :class:`~cervspine.inference.predictor.Predictor` needs of a stage-2 model."""

    kind: str  # "slice" | "sequence": names the model family in records and reports
    checkpoint: Path
    data_hp: dict[str, Any]  # the DataModule's hyper-parameters saved with the checkpoint

    @property
    def image_size(self) -> int | None: ...

    @property
    def backbone(self) -> str: ...

    @property
    def calibrated(self) -> bool: ...

    @property
    def prior(self) -> np.ndarray:
        """(8,) the training prior: the answer known without looking."""
        ...

    def inputs(self, study: CachedStudy, stage1: Stage1Output) -> Any: ...

    def score(self, inputs: Any) -> Stage2Result: ...

    def explain(
        self, study: CachedStudy, stage1: Stage1Output, slices: np.ndarray, levels: list[int]
    ) -> Explanation | None: ...


Stage2Factory = Callable[..., Stage2]
STAGE2: dict[str, Stage2Factory] = {}
"""LightningModule class name (the checkpoint's ``model_class``) → strategy ``from_checkpoint``."""
DEFAULT_MODEL_CLASS = "FractureClassifier"  # checkpoints from before model_class was recorded


def register_stage2(model_class: str) -> Callable[[type], type]:
    """Class decorator: the strategy for checkpoints of ``model_class``."""

    def wrap(cls: type) -> type:
        STAGE2[model_class] = cls.from_checkpoint
        return cls

    return wrap


def load_stage2(path: str | Path, runtime: Runtime, **options: Any) -> Stage2:
    """The strategy for the stage-2 checkpoint at ``path`` (chosen by the class it records)."""
    ckpt = read_checkpoint(path)
    name = model_class_name(ckpt, DEFAULT_MODEL_CLASS)
    if name not in STAGE2:
        raise ValueError(f"{path}: unknown stage-2 model class {name!r} (known: {sorted(STAGE2)})")
    return STAGE2[name](path, runtime, ckpt=ckpt, **options)
