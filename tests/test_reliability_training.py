"""Faults during training (issue 8): NaN/Inf loss, a full disk on a checkpoint write, SIGKILL mid-epoch.

Each case and its expected outcome is listed in docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from cervspine.models.fracture import FractureClassifier
from cervspine.models.safe_load import load_checkpoint
from cervspine.train import train
from cervspine.training.guards import AtomicCheckpointIO, NonFiniteLossError, NonFiniteLossGuard
from tests.helpers import TINY_DATA, TINY_STAGE2, hydra_config, mounted_tmpfs

NAN, INF = float("nan"), float("inf")
REPO = Path(__file__).resolve().parents[1]


def _overrides(root: Path, epochs: int = 2, batches: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    """fracture_demo on the tiny folder with timm's 0.4M-parameter test_resnet: fast, small checkpoints."""
    return [
        "experiment=fracture_demo", f"data.root={root}", *TINY_DATA, *TINY_STAGE2, "print_config=false",
        "model.backbone.name=test_resnet", f"trainer.max_epochs={epochs}",
        f"+trainer.limit_train_batches={batches}", "+trainer.limit_val_batches=1",
        "+trainer.enable_progress_bar=false", *extra,
    ]  # fmt: skip


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def _load(path: Path) -> dict:
    return load_checkpoint(path)


def _finite(ckpt: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values() if t.is_floating_point())


class Poison:
    """Multiplies the training loss by NaN/Inf at chosen global steps; records the weights before each."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.before: dict[int, torch.Tensor] = {}
        self.module: torch.nn.Module | None = None


@pytest.fixture()
def poison(monkeypatch) -> Iterator[Poison]:
    p = Poison()
    original = FractureClassifier.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        p.module = self
        p.before[self.global_step] = _flat(self)
        return loss * p.at[self.global_step] if self.global_step in p.at else loss

    monkeypatch.setattr(FractureClassifier, "training_step", training_step)
    yield p


# ----------------------------------------------------------------------------------- NaN / Inf loss


def test_the_guards_are_in_the_default_callbacks(tiny_root, tmp_path):
    with hydra_config("train", _overrides(tiny_root), tmp_path) as cfg:
        assert cfg.callbacks.nonfinite_loss_guard._target_ == "cervspine.training.guards.NonFiniteLossGuard"
        assert cfg.callbacks.nonfinite_loss_guard.action == "stop"
        assert cfg.callbacks.atomic_checkpoints._target_ == "cervspine.training.guards.AtomicCheckpoints"
    with pytest.raises(ValueError, match="action"):
        NonFiniteLossGuard(action="ignore")


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_loss_stops_before_the_weights_change(tiny_root, tmp_path, poison, value):
    poison.at[3] = value  # epoch 1, second batch
    with (
        hydra_config("train", _overrides(tiny_root), tmp_path) as cfg,
        pytest.raises(NonFiniteLossError) as err,
    ):
        train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    message = str(err.value)
    assert "epoch 1, global step 3" in message and str(last) in message and "action=skip" in message
    assert torch.equal(_flat(poison.module), poison.before[3])  # the bad step changed nothing
    ckpt = _load(last)
    assert ckpt["global_step"] == 2 and _finite(ckpt)  # the last good checkpoint (end of epoch 0)


def test_skip_mode_skips_the_bad_steps_and_finishes(tiny_root, tmp_path, poison):
    poison.at.update({1: NAN, 2: INF})
    extra = ("callbacks.nonfinite_loss_guard.action=skip",)
    with hydra_config("train", _overrides(tiny_root, extra=extra), tmp_path) as cfg:
        _, objects = train(cfg)
    trainer = objects["trainer"]
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteLossGuard))
    assert trainer.global_step == 4 and guard.skipped == 2
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # installed by AtomicCheckpoints
    assert not torch.equal(poison.before[0], poison.before[1])  # a good step updates the weights
    assert torch.equal(poison.before[1], poison.before[3])  # the two bad steps did not
    assert _finite(_load(tmp_path / "checkpoints" / "last.ckpt"))


def test_skip_mode_stops_after_too_many_bad_steps_in_a_row(tiny_root, tmp_path, poison):
    poison.at.update({1: NAN, 2: NAN})
    extra = (
        "callbacks.nonfinite_loss_guard.action=skip",
        "callbacks.nonfinite_loss_guard.max_consecutive_skips=1",
    )
    with (
        hydra_config("train", _overrides(tiny_root, extra=extra), tmp_path) as cfg,
        pytest.raises(NonFiniteLossError, match=r"global step 2; stopped \(2 in a row"),
    ):
        train(cfg)
    assert torch.equal(_flat(poison.module), poison.before[1])


class _InfGradient(BoringModel):
    def on_after_backward(self) -> None:
        if self.global_step == 1:
            next(self.parameters()).grad.fill_(INF)


def test_check_gradients_catches_a_nonfinite_gradient_with_a_finite_loss(tmp_path):
    model = _InfGradient()
    guard = NonFiniteLossGuard(check_gradients=True)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[guard], default_root_dir=tmp_path, limit_val_batches=0,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="non-finite training gradient at epoch 0, global step 1"):
        trainer.fit(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------- full disk on a checkpoint


def test_checkpoint_write_on_a_full_disk_keeps_last_ckpt(tiny_root, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):  # epoch 0 writes epoch000.ckpt and last.ckpt; then the disk is full
        calls.append(f)
        if len(calls) <= 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 1000)  # a partial write, then ENOSPC
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    with hydra_config("train", _overrides(tiny_root), tmp_path) as cfg, pytest.raises(OSError) as err:
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert err.value.errno == errno.ENOSPC
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch000.ckpt", "last.ckpt"]  # no temp files
    ckpt = _load(ckpt_dir / "last.ckpt")
    assert ckpt["global_step"] == 2 and _finite(ckpt)


def test_atomic_checkpoint_io_on_a_real_full_disk(tmp_path):
    # a tmpfs is another filesystem than /tmp, where Lightning's own save would copy over the old file
    with mounted_tmpfs(tmp_path / "ckpt", "1m") as folder:
        path, io = folder / "last.ckpt", AtomicCheckpointIO()
        io.save_checkpoint({"w": torch.zeros(100_000)}, path)  # 400 kB
        with pytest.raises(OSError) as err:
            io.save_checkpoint({"w": torch.ones(300_000)}, path)  # 1.2 MB: does not fit
        assert err.value.errno == errno.ENOSPC
        assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
        assert torch.equal(io.load_checkpoint(path)["w"], torch.zeros(100_000))


# --------------------------------------------------------------------------- SIGKILL mid-epoch, resume


def _train_cli(root: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    """``python -m cervspine.train`` in the background; stderr goes to ``<run_dir>.log``."""
    # last.ckpt is written after every step, so a kill can land in the middle of a checkpoint write
    args = [*_overrides(root, epochs=2, batches=4), "callbacks.last_checkpoint.every_n_train_steps=1",
            f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    with open(run_dir.with_suffix(".log"), "a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "cervspine.train", *args], cwd=REPO, stdout=log, stderr=log
        )


def _finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 400) -> None:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, run_dir.with_suffix(".log").read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_killed_mid_epoch_resumes_to_the_same_final_step(tiny_root, tmp_path):
    _finish(_train_cli(tiny_root, tmp_path / "reference"), tmp_path / "reference")
    expected = json.loads((tmp_path / "reference" / "train_summary.json").read_text())["global_step"]
    assert expected == 8

    run, beacon = tmp_path / "run", tmp_path / "step.txt"
    proc = _train_cli(tiny_root, run, "+callbacks.beacon._target_=tests.helpers.StepBeacon",
                      f"+callbacks.beacon.path={beacon}")  # fmt: skip
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if beacon.is_file() and int(beacon.read_text() or 0) >= 6:  # mid-epoch 2 (steps 5..8)
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (run / "train_summary.json").exists()
    killed_at = _load(run / "checkpoints" / "last.ckpt")["global_step"]  # complete, never half-written
    assert 5 <= killed_at < expected

    _finish(_train_cli(tiny_root, run, "ckpt_path=last"), run)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == expected
    assert _load(run / "checkpoints" / "last.ckpt")["global_step"] == expected
