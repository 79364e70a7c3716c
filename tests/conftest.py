"""Shared fixtures: tiny synthetic RSNA folders written to tmp dirs, Hydra configs composed for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cervspine.config import composed

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

TINY = dict(n_train=12, n_test=2, size=64, slices=(40, 52), seed=3, seg_fraction=0.75, box_fraction=0.5)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny RSNA-format folder (12 train / 2 test studies, 64², ~45 slices), written once per session."""
    from cervspine.synthetic import write_rsna_folder

    root = tmp_path_factory.mktemp("rsna") / "tiny"
    write_rsna_folder(root, **TINY)
    return root


# Settings that make the demo experiments tiny and fast on the tiny folder.
TINY_DATA = ["data.image_size=64", "data.n_folds=3", "data.num_workers=0", "data.preprocess_workers=1"]
TINY_STAGE1 = ["data.input_size=64", "data.batch_size=16"]
TINY_STAGE2 = ["data.input_size=32", "data.batch_size=16", "data.epoch_size=64"]


def tiny_pipeline_overrides(root: Path, experiment: str, **stage2: list[str]) -> list[str]:
    """Pipeline overrides for a one-epoch, two-batch run of ``experiment`` on the tiny folder.
    ``stage2``: extra train overrides per stage-2 key (``stage2=[...]``, ``stage2_ensemble__seq=[...]``
    for the ensemble member ``seq``), added to the tiny stage-2 settings."""
    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"]
    stage_data = [o for o in TINY_DATA if not o.startswith(("data.image_size", "data.n_folds"))]

    def quoted(items: list[str]) -> str:
        return "[" + ",".join(f'"{x}"' for x in items) + "]"

    out = [
        f"data.root={root}",
        f"experiment={experiment}",
        "data.image_size=64",
        "data.n_folds=3",
        "n_bootstrap=20",
        "progress=false",
        f"stage1.overrides={quoted(short + stage_data + TINY_STAGE1)}",
    ]
    for key, extra in {"stage2": [], **stage2}.items():
        path = key.replace("__", ".")
        out.append(f"{path}.overrides={quoted(short + stage_data + TINY_STAGE2 + extra)}")
    return out


hydra_config = composed  # the tests' name for it
