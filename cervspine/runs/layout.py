"""Locating the trained stages of a pipeline run folder, and the data settings they imply."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

STAGE_DIRS = {"stage1": "stage1", "stage2": "stage2"}


def best_checkpoint(train_dir: str | Path) -> Path:
    """The best checkpoint recorded in ``<train_dir>/train_summary.json`` (else last.ckpt).

    The summary records absolute paths; a file of that name in ``<train_dir>/checkpoints/`` wins, so a run
    folder that was moved or copied reads its own checkpoints, never those now at the old path."""
    train_dir = Path(train_dir)
    summary = train_dir / "train_summary.json"
    if summary.is_file():
        info = json.loads(summary.read_text())
        for key in ("best_model_path", "last_model_path"):
            p = info.get(key)
            if not p:
                continue
            for candidate in (train_dir / "checkpoints" / Path(p).name, Path(p)):
                if candidate.is_file():
                    return candidate
    last = train_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    raise FileNotFoundError(f"{train_dir}: no trained model (train_summary.json or checkpoints/last.ckpt)")


def stage_checkpoints(
    run_dir: str | Path, stage1: str | None = None, stage2: str | Sequence[str] | None = None
) -> tuple[Path, Path | list[Path]]:
    """Explicit checkpoint paths win; otherwise the best checkpoints of ``run_dir/stage1`` and ``/stage2``
    — plus those of the run's ``stage2_<name>/`` ensemble members where the pipeline trained some.
    Several stage-2 checkpoints (listed, or found) come back as a list: an ensemble, see
    ``inference.load_predictor``."""
    run = Path(run_dir) if run_dir else None
    s1 = Path(stage1) if stage1 else best_checkpoint(run / STAGE_DIRS["stage1"]) if run else None
    s2: Path | list[Path] | None = None
    if stage2 and not isinstance(stage2, (str, Path)):
        s2 = [Path(p) for p in stage2]
    elif stage2:
        s2 = Path(stage2)
    elif run:
        members = sorted(
            d for d in run.glob(f"{STAGE_DIRS['stage2']}_*") if (d / "train_summary.json").is_file()
        )
        s2 = best_checkpoint(run / STAGE_DIRS["stage2"])
        s2 = [s2, *(best_checkpoint(d) for d in members)] if members else s2
    if s1 is None or s2 is None:
        raise ValueError("give run_dir=<pipeline run folder> or both ckpt.stage1=... and ckpt.stage2=...")
    for p in (s1, *(s2 if isinstance(s2, list) else [s2])):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
    return s1, s2
