"""Stage 1 at inference: which of C1–C7 each slice of a study shows, and the spine's in-plane box.

A :class:`Stage1` strategy turns a cached study into :class:`Stage1Output` (the stage-1 table's rows);
:func:`load_stage1` picks the strategy a checkpoint needs by the model class it records: the per-slice
detector (:mod:`.slice_stage1`) or the whole-column model (:mod:`.column_stage1`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cervspine.cache import CachedStudy
from cervspine.data.stage1_table import Stage1Output  # noqa: F401  (re-exported: its home before)
from cervspine.inference.checkpoints import model_class_name, read_checkpoint
from cervspine.inference.runtime import Runtime


class Stage1(Protocol):
    """What the :class:`~cervspine.inference.predictor.Predictor` and the pipeline need of stage 1."""

    kind: str  # "slice" | "column"
    checkpoint: Path
    data_hp: dict[str, Any]

    @property
    def image_size(self) -> int | None: ...

    def run(self, study: CachedStudy) -> Stage1Output: ...


STAGE1: dict[str, Callable[..., Stage1]] = {}
"""LightningModule class name (the checkpoint's ``model_class``) → strategy ``from_checkpoint``."""
DEFAULT_MODEL_CLASS = "VertebraeDetector"  # checkpoints from before model_class was recorded


def register_stage1(model_class: str) -> Callable[[type], type]:
    """Class decorator: the strategy for stage-1 checkpoints of ``model_class``."""

    def wrap(cls: type) -> type:
        STAGE1[model_class] = cls.from_checkpoint
        return cls

    return wrap


def load_stage1(path: str | Path, runtime: Runtime) -> Stage1:
    """The strategy for the stage-1 checkpoint at ``path`` (chosen by the class it records)."""
    ckpt = read_checkpoint(path)
    name = model_class_name(ckpt, DEFAULT_MODEL_CLASS)
    if name not in STAGE1:
        raise ValueError(f"{path}: unknown stage-1 model class {name!r} (known: {sorted(STAGE1)})")
    return STAGE1[name](path, runtime, ckpt=ckpt)
