"""The rehearsal's instruments: the loader-wait callback, the job it runs (experiment=rsna's stages as it
overrides them), and its committed table (written from its committed JSON)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cervspine.training.callbacks import ThroughputMonitor

REPO = Path(__file__).resolve().parents[1]


class _SlowItems(Dataset):
    def __init__(self, sleep: float):
        self.sleep = sleep

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i):
        time.sleep(self.sleep)
        return {"image": torch.randn(4), "target": torch.randn(1)}


def _fit(sleep: float, tmp_path: Path) -> dict:
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            return ((self.lin(batch["image"]) - batch["target"]) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    flags = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[ThroughputMonitor()], accelerator="cpu", default_root_dir=str(tmp_path),
        enable_model_summary=False, **flags,
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(_SlowItems(sleep), batch_size=3))
    return json.loads((tmp_path / "throughput.json").read_text())


def test_the_monitor_sees_a_slow_loader(tmp_path):
    slow = _fit(0.1, tmp_path / "slow")
    assert slow["batches"] == 8 and slow["measured_batches"] == 7 and slow["batch_size"] == 3
    assert slow["waited_fraction"] == 1.0 and slow["wait_time_fraction"] > 0.5
    assert slow["wait_s_median"] >= 0.3  # three items of 100 ms a batch
    assert slow["train_samples_per_s"] < 3 / 0.3 and slow["peak_rss_gib"] > 0
    fast = _fit(0.0, tmp_path / "fast")
    assert fast["wait_s_median"] < slow["wait_s_median"] / 3


def test_the_rehearsal_runs_experiment_rsna_at_real_sizes(tiny_root, tmp_path):
    from cervspine.config import composed
    from cervspine.jobs.pipeline import stage_config, stage_keys
    from experiments.rehearsal import STAGES, pipeline_overrides

    with composed(
        "pipeline", pipeline_overrides("cpu", tiny_root, tmp_path / "cache"), tmp_path / "run"
    ) as cfg:
        assert cfg.experiment_name == "rsna" and cfg.data.image_size == 512
        assert (cfg.data.cache_compression, cfg.data.cache_hu_floor) == ("htj2k", -500)
        keys = stage_keys(cfg)
        assert sorted(keys) == sorted(k for k, *_ in STAGES.values())
        for stage in keys:
            s = stage_config(cfg, stage, tmp_path / stage)
            assert s.trainer.accelerator == "cpu" and s.trainer.limit_train_batches == 3
            assert s.callbacks.throughput._target_.endswith("ThroughputMonitor")
            assert s.model.backbone.pretrained is False and s.data.image_size == 512
            assert (s.data.cache_compression, s.data.cache_hu_floor) == ("htj2k", -500)
        sizes = {k: stage_config(cfg, k, tmp_path / k).data.input_size for k in keys}
        assert sizes == {k: size for k, _, size, _ in STAGES.values()}


def test_the_committed_table_is_its_json():
    from experiments.rehearsal import markdown

    path = REPO / "experiments" / "rehearsal.json"
    if not path.is_file():
        pytest.skip("no committed rehearsal")
    result = json.loads(path.read_text())
    assert (REPO / "experiments" / "rehearsal.md").read_text() == markdown(result)
    assert set(result["projection"]["stages"]) == {"train_stage1", "train_stage2", "train_stage2_slice"}
