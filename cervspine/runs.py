"""Locating the trained stages of a pipeline run folder."""

from __future__ import annotations

import json
from pathlib import Path

STAGE_DIRS = {"stage1": "stage1", "stage2": "stage2"}


def best_checkpoint(train_dir: str | Path) -> Path:
    """The best checkpoint recorded in ``<train_dir>/train_summary.json`` (else last.ckpt)."""
    train_dir = Path(train_dir)
    summary = train_dir / "train_summary.json"
    if summary.is_file():
        info = json.loads(summary.read_text())
        for key in ("best_model_path", "last_model_path"):
            p = info.get(key)
            if p and Path(p).is_file():
                return Path(p)
    last = train_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    raise FileNotFoundError(f"{train_dir}: no trained model (train_summary.json or checkpoints/last.ckpt)")


def stage_checkpoints(
    run_dir: str | Path, stage1: str | None = None, stage2: str | None = None
) -> tuple[Path, Path]:
    """Explicit checkpoint paths win; otherwise the best checkpoints of ``run_dir/stage1`` and ``/stage2``."""
    run = Path(run_dir) if run_dir else None
    s1 = Path(stage1) if stage1 else best_checkpoint(run / STAGE_DIRS["stage1"]) if run else None
    s2 = Path(stage2) if stage2 else best_checkpoint(run / STAGE_DIRS["stage2"]) if run else None
    if s1 is None or s2 is None:
        raise ValueError("give run_dir=<pipeline run folder> or both ckpt.stage1=... and ckpt.stage2=...")
    for p in (s1, s2):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint not found: {p}")
    return s1, s2


def is_synthetic(root: str | Path) -> bool:
    """True for folders made by ``cervspine.synthesize`` (they carry ``synthetic_manifest.csv``)."""
    return (Path(root) / "synthetic_manifest.csv").is_file()
