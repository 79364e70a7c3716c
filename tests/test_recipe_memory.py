"""CPU runs of the real recipes fit the machine: the memory guard's estimate, the loader workers it lowers,
the run it refuses before training (naming the estimate and the settings that fit). No real training."""

from __future__ import annotations

import time

import pytest
from hydra.utils import instantiate

from cervspine.training.memory import (
    GIB,
    MemoryBudgetExceeded,
    MemoryEstimate,
    MemoryGuard,
    checkpoint_segments,
    checkpointed_bytes,
    fitting_batch,
    fitting_workers,
    saved_bytes,
)
from tests.helpers import TINY_DATA, hydra_config
from tests.test_recipes_pretrained import REAL_RECIPES


def _estimate(**kw) -> MemoryEstimate:
    parts = dict(process=2 * GIB, optimizer=GIB // 2, activations=6 * GIB, inputs=GIB // 2, per_worker=GIB,
                 workers=8, step_images=60, bytes_per_image=GIB // 10)  # fmt: skip
    return MemoryEstimate(**{**parts, **kw})


def test_the_saved_activations_grow_with_the_pixels_and_shrink_with_checkpointing():
    from cervspine.models.backbones import create_backbone

    net = create_backbone("test_efficientnet", in_chans=3)
    small, _ = saved_bytes(net, 3, 32)
    large, block = saved_bytes(net, 3, 64, segments=checkpoint_segments(net))
    assert 3.0 < large / small < 5.0  # ∝ pixels, the parameters not counted
    assert 0 < block < large
    ckpt = checkpointed_bytes(net, 3, 64, block)
    assert ckpt is not None and block < ckpt < large
    assert not net.grad_checkpointing  # the probe leaves the backbone as it found it


def test_workers_are_lowered_to_what_fits_and_none_when_the_main_process_does_not():
    est = _estimate()
    assert est.main() == 9 * GIB and est.total() == 17 * GIB
    assert fitting_workers(est, 24 * GIB) == 8
    assert fitting_workers(est, int(11.5 * GIB)) == 2
    assert fitting_workers(est, 9 * GIB) == 0
    assert fitting_workers(est, 8 * GIB) is None


def test_the_batch_that_fits_is_named_from_the_per_sample_share():
    est = _estimate(step_images=60, bytes_per_image=GIB // 10, activations=int(1.3 * 60 * GIB // 10))
    facts = {"train_images": 15, "image_bytes": 0, "batch": 4}
    # fixed 2 + 0.5 + 0.5 GiB; a sample 15 images × 0.1 GiB × 1.3 = 1.95 GiB
    assert fitting_batch(est, facts, int(8 * GIB)) == 2
    assert fitting_batch(est, facts, int(2.5 * GIB)) == 0


@pytest.fixture
def tiny_b5(tiny_root, tiny_cache, tmp_path):
    """fracture_b5's data module (set up on the tiny folder's 64² cache) and model, shrunk to one tiny
    CPU batch: what the guard inspects, without a Trainer."""
    overrides = ["experiment=fracture_b5", f"data.root={tiny_root}", *TINY_DATA, "data.input_size=32",
                 "data.batch_size=2", "data.num_workers=3", "model.backbone.name=test_efficientnet",
                 "model.backbone.pretrained=false", "trainer=cpu"]  # fmt: skip
    with hydra_config("train", overrides, tmp_path) as cfg:
        dm, model = instantiate(cfg.data), instantiate(cfg.model)
    dm.setup("fit")
    return dm, model


def test_the_guard_lowers_the_loader_workers_of_a_run_that_fits_without_them(tiny_b5):
    from cervspine.training.memory import estimate

    dm, model = tiny_b5
    est, _ = estimate(model, dm)
    assert est.workers == 3 and est.step_images == 2 and est.bytes_per_image > 0
    roomy = MemoryGuard(budget_gb=(est.total() + GIB) / GIB)
    assert roomy.size(model, dm) == 3 and dm.num_workers == 3
    tight = MemoryGuard(budget_gb=(est.main() + 1.5 * est.per_worker) / GIB)
    assert tight.size(model, dm) == 1 and dm.num_workers == 1
    assert tight.report["configured_workers"] == 3 and tight.report["workers"] == 1


def test_the_guard_refuses_when_not_even_the_main_process_fits(tiny_b5):
    dm, model = tiny_b5
    guard = MemoryGuard(budget_gb=0.01)
    with pytest.raises(MemoryBudgetExceeded) as e:
        guard.size(model, dm)
    said = str(e.value)
    assert "GiB = process" in said and "activations" in said and "callbacks.memory_guard.budget_gb=" in said
    assert "model.backbone.grad_checkpointing=true" in said  # test_efficientnet has timm's checkpointing


def test_a_real_recipe_on_the_cpu_is_refused_before_its_first_step(tiny_root, tiny_cache, tmp_path):
    """``experiment=fracture_seq trainer=cpu`` at the recipe's sizes (28 sequences × 15 crops of 224² a
    step, EfficientNetV2-S): tens of GiB of activations, refused with the estimate on a 16 GiB budget."""
    from cervspine.train import train

    overrides = ["experiment=fracture_seq", f"data.root={tiny_root}", *TINY_DATA, "trainer=cpu",
                 "model.backbone.pretrained=false", "callbacks.memory_guard.budget_gb=16",
                 "print_config=false"]  # fmt: skip
    with hydra_config("train", overrides, tmp_path) as cfg:
        assert (cfg.data.input_size, cfg.data.batch_size, cfg.data.n_slices) == (224, 28, 15)
        started = time.perf_counter()
        with pytest.raises(MemoryBudgetExceeded) as e:
            train(cfg)
        seconds = time.perf_counter() - started
    said = str(e.value)
    assert "420 images a step" in said and "data.batch_size=" in said and "grad_checkpointing=true" in said
    assert (tmp_path / "memory_estimate.json").is_file() and not (tmp_path / "checkpoints").exists()
    assert seconds < 60, seconds  # ~10 s here: the backbone built, one 224² image probed twice


@pytest.mark.parametrize("recipe", REAL_RECIPES)
def test_every_real_recipe_trains_on_the_cpu_under_the_guard(recipe, tiny_root, tmp_path):
    with hydra_config(
        "train", [f"experiment={recipe}", f"data.root={tiny_root}", "trainer=cpu"], tmp_path
    ) as cfg:
        guard = instantiate(cfg.callbacks.memory_guard)
    assert isinstance(guard, MemoryGuard) and guard.enabled and guard.accelerators == ("cpu",)
