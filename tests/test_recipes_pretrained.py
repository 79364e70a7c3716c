"""The real-data train recipes start from ImageNet weights and, offline without cached weights, stop within
seconds naming both ways out (as the pipeline job does); the demo recipes stay random-init."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, hydra_config

REAL_RECIPES = ("vertebrae_column", "fracture_seq", "fracture_seq_384", "fracture_b5", "vertebrae_b5")
DEMO_RECIPES = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*_demo.yaml"))
BACKBONE = {"vertebrae_column": "efficientnet_b0", "fracture_seq": "tf_efficientnetv2_s",
            "fracture_seq_384": "tf_efficientnetv2_s", "fracture_b5": "tf_efficientnet_b5",
            "vertebrae_b5": "tf_efficientnet_b5"}  # fmt: skip


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """A machine with the hub off and no cached weights (both caches point at empty folders)."""
    import torch
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _overrides(recipe: str, root: Path, cache: Path, *extra: str) -> list[str]:
    return [f"experiment={recipe}", f"data.root={root}", "trainer=cpu", f"data.cache_dir={cache}",
            "print_config=false", *extra]  # fmt: skip


def test_the_real_recipe_list_is_every_non_demo_train_recipe():
    recipes = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    assert recipes - set(DEMO_RECIPES) == set(REAL_RECIPES)


@pytest.mark.parametrize("recipe", REAL_RECIPES)
def test_a_real_recipe_offline_without_cached_weights_stops_in_seconds(recipe, tiny_root, offline_empty_hub,
                                                                       tmp_path):  # fmt: skip
    from cervspine.models.backbones import PretrainedWeightsUnavailable
    from cervspine.train import train

    cache, run = tmp_path / "cache", tmp_path / "run"
    with hydra_config("train", _overrides(recipe, tiny_root, cache), run) as cfg:
        assert cfg.model.backbone.pretrained is True and cfg.model.backbone.name == BACKBONE[recipe]
        started = time.perf_counter()
        with pytest.raises(PretrainedWeightsUnavailable) as e:
            train(cfg)
        seconds = time.perf_counter() - started
    said = str(e.value)
    assert "model.backbone.weights_path=" in said and "model.backbone.pretrained=false" in said
    assert BACKBONE[recipe] in said
    assert seconds < 10, seconds  # well under a second here: the cache looked up, the hub not asked
    assert not cache.exists() and not (run / "run_info.json").exists()  # nothing built, nothing recorded


@pytest.mark.parametrize("recipe", ["fracture_seq", "vertebrae_b5"])
def test_a_missing_weights_file_is_named_before_any_work(recipe, tiny_root, tmp_path):
    from cervspine.train import train

    missing = tmp_path / "nowhere.safetensors"
    overrides = _overrides(recipe, tiny_root, tmp_path / "cache", f"model.backbone.weights_path={missing}")
    with hydra_config("train", overrides, tmp_path / "run") as cfg, pytest.raises(FileNotFoundError) as e:
        train(cfg)
    assert str(missing) in str(e.value) and "model.backbone.weights_path" in str(e.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("recipe", DEMO_RECIPES)
def test_the_demo_recipes_stay_random_init(recipe, tiny_root, tmp_path):
    with hydra_config("train", [f"experiment={recipe}", f"data.root={tiny_root}"], tmp_path) as cfg:
        assert cfg.model.backbone.pretrained is False and not cfg.model.backbone.weights_path


def test_the_train_command_offline_exits_naming_both_overrides(tiny_root, tmp_path):
    """``python -m cervspine.train experiment=fracture_b5 data.root=… trainer=cpu`` on a machine whose hub is
    off and whose caches are empty: exit 1, the message on stderr, in seconds (most of them imports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TIMM_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "cervspine.train", *_overrides("fracture_b5", tiny_root, cache),
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert "model.backbone.weights_path=" in err and "model.backbone.pretrained=false" in err, err[-2000:]
    assert "tf_efficientnet_b5" in err and not cache.exists()
    assert seconds < 110, seconds  # ~10 s here, nearly all imports; timm's own retries take ~50 s
