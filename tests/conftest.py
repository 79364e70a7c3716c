"""Shared fixtures: tiny synthetic RSNA folders written to tmp dirs, Hydra configs composed for real."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

TINY = dict(n_train=12, n_test=2, size=64, slices=(40, 52), seed=3, seg_fraction=0.75, box_fraction=0.5)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny RSNA-format folder (12 train / 2 test studies, 64², ~45 slices), written once per session."""
    from cervspine.data.synthetic import write_rsna_folder

    root = tmp_path_factory.mktemp("rsna") / "tiny"
    write_rsna_folder(root, **TINY)
    return root


# Settings that make the demo experiments tiny and fast on the tiny folder.
TINY_DATA = ["data.image_size=64", "data.n_folds=3", "data.num_workers=0", "data.preprocess_workers=1"]
TINY_STAGE1 = ["data.input_size=64", "data.batch_size=16"]
TINY_STAGE2 = ["data.input_size=32", "data.batch_size=16", "data.epoch_size=64"]


@contextlib.contextmanager
def hydra_config(config_name: str, overrides: list[str], output_dir: Path) -> Iterator[DictConfig]:
    """Compose ``conf/<config_name>.yaml`` as the entry point would, with its run dir at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.num = 0
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir / "logs")
            del cfg["hydra"]
        yield cfg
    GlobalHydra.instance().clear()
