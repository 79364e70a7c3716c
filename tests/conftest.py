"""Fixtures: the tiny synthetic RSNA folder, one trained pipeline run and one W&B training on it, each made
once per test session (once for all pytest-xdist workers too) and read-only afterwards; a check after each
test that none of them changed. Helpers for the tests are in tests/helpers.py.

``CERVSPINE_REVERSE_TESTS=1`` runs the collected tests in reverse order (order independence)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from tests.helpers import (
    TINY,
    TINY_CACHE,
    changes,
    hydra_config,
    set_writable,
    shared_run_overrides,
    snapshot,
    train_overrides,
)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1:  # the workers share the cores: one torch thread each, no oversubscription
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

_READ_ONLY: dict[Path, dict] = {}  # shared folder → its snapshot when this process got it


class _Reverse:
    @pytest.hookimpl(trylast=True)  # after pytest's own ordering by fixture scope
    def pytest_collection_modifyitems(self, config, items):
        items.reverse()


def pytest_configure(config):
    if os.environ.get("CERVSPINE_REVERSE_TESTS") == "1":
        config.pluginmanager.register(_Reverse(), "cervspine-reverse-tests")


@pytest.fixture(autouse=True)
def _shared_folders_unchanged(request):
    """After a test that used a shared folder: fail it, naming the paths, if that folder changed."""
    yield
    if not _READ_ONLY or "tiny_root" not in request.fixturenames:
        return
    for folder, before in _READ_ONLY.items():
        diff = changes(before, snapshot(folder))
        if diff:
            _READ_ONLY[folder] = snapshot(folder)  # report each change once
            pytest.fail(f"{request.node.nodeid} changed the shared read-only {folder}: {diff[:10]}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _made_once(tmp_path_factory, name: str, make: Callable[[Path], dict]) -> tuple[Path, dict]:
    """``make(folder)`` once for the session, then the folder read-only: (folder, what ``make`` returned,
    JSON-able). pytest-xdist workers share one: the first to get there makes it under a lock in their
    common temp folder, the others wait and read it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        info = make(folder)
    else:
        common = tmp_path_factory.getbasetemp().parent
        folder, done = common / name, common / f"{name}.json"
        with _locked(common / f"{name}.lock"):
            if not done.is_file():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                done.write_text(json.dumps(make(folder)))
            info = json.loads(done.read_text())
    set_writable(folder, False)
    _READ_ONLY[folder] = snapshot(folder)
    return folder, info


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny RSNA-format folder (12 train / 2 test studies, 64², ~45 slices) with its 64² cache
    (``TINY_CACHE``), written once and then read-only: tests that write make a copy
    (``helpers.writable_copy``)."""

    def make(folder: Path) -> dict:
        from cervspine.cache import CacheParams, preprocess
        from cervspine.io.rsna import RsnaIndex
        from cervspine.synthetic import write_rsna_folder

        root = folder / "tiny"
        write_rsna_folder(root, **TINY)
        report = preprocess(RsnaIndex.from_root(root), root / TINY_CACHE, CacheParams(image_size=64),
                            workers=2, progress=False)  # fmt: skip
        assert report.ok, report.failed
        return {}

    return _made_once(tmp_path_factory, "rsna", make)[0] / "tiny"


@pytest.fixture(scope="session")
def tiny_cache(tiny_root) -> Path:
    """The tiny folder's cache at 64² (the one every tiny training and run uses)."""
    return tiny_root / TINY_CACHE


@dataclass
class SharedRun:
    """One tiny ``demo_ensemble`` pipeline run (``helpers.shared_run_overrides``), run twice."""

    dir: Path
    result: dict
    mtimes_after_run: dict[str, int] = field(default_factory=dict)  # output file → mtime, after run 1
    mtimes_after_rerun: dict[str, int] = field(default_factory=dict)  # … after the rerun (all current)

    @property
    def stage1(self) -> Path:
        from cervspine.runs.layout import best_checkpoint

        return best_checkpoint(self.dir / "stage1")

    @property
    def slice_stage2(self) -> Path:
        from cervspine.runs.layout import best_checkpoint

        return best_checkpoint(self.dir / "stage2")

    @property
    def seq_stage2(self) -> Path:
        from cervspine.runs.layout import best_checkpoint

        return best_checkpoint(self.dir / "stage2_seq")


def _outputs(run: Path) -> dict[str, int]:
    names = ["submission.csv", "stage1_predictions.parquet", "metrics.json", "steps.json"]
    names += [str(p.relative_to(run)) for p in run.glob("stage*/checkpoints/*.ckpt")]
    return {n: (run / n).stat().st_mtime_ns for n in names}


@pytest.fixture(scope="session")
def shared_run(tiny_root, tmp_path_factory) -> SharedRun:
    """The trained run the tests share: stage 1, the slice stage 2 (``stage2/``) and the sequence stage 2
    (``stage2_seq/``) of ``demo_ensemble`` on the tiny folder, with ``report/``, ``study_reports/`` and
    the model card; then the same command again (every step current). Read-only afterwards."""

    def make(out: Path) -> dict:
        from cervspine.pipeline import run

        with hydra_config("pipeline", shared_run_overrides(tiny_root), out) as cfg:
            result = run(cfg)
        shared = SharedRun(out, result, _outputs(out))
        with hydra_config("pipeline", shared_run_overrides(tiny_root), out) as cfg:
            run(cfg)
        shared.mtimes_after_rerun = _outputs(out)
        return json.loads(json.dumps(asdict(shared), default=str))

    out, info = _made_once(tmp_path_factory, "shared_run", make)
    result = {**info["result"], "run_dir": out}
    result["submission"] = Path(result["submission"]) if result["submission"] else None
    return SharedRun(out, result, info["mtimes_after_run"], info["mtimes_after_rerun"])


@pytest.fixture(scope="session")
def wandb_run(tiny_root, tmp_path_factory) -> Path:
    """fracture_demo (test_resnet, one epoch of two batches) logged to W&B offline with the validation-ROC
    image callback, no W&B login around: the run folder (``wandb/offline-run-*``), read-only."""

    def make(out: Path) -> dict:
        from cervspine.train import train

        overrides = train_overrides(tiny_root, "fracture_demo", "model.backbone.name=test_resnet",
                                    "logger=wandb", "callbacks=wandb_images", "trainer.max_epochs=1",
                                    "+trainer.limit_train_batches=2",
                                    "+trainer.limit_val_batches=4")  # fmt: skip
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WANDB_MODE", "offline")
            mp.delenv("WANDB_API_KEY", raising=False)
            mp.setenv("NETRC", str(out / "no-netrc"))
            with hydra_config("train", overrides, out) as cfg:
                assert cfg.logger.wandb.offline is True
                train(cfg)
        import wandb

        wandb.teardown()  # the W&B service has written everything of the run before it becomes read-only
        return {}

    return _made_once(tmp_path_factory, "wandb_run", make)[0]
