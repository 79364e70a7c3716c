"""The real-data job, ``experiment=rsna``: its shrunk run (``smoke=true``) to a submission and a report
from a cache that two ``shard=i/N`` preprocessing runs built; and what stops it within seconds, before any
preprocessing: pretrained weights that cannot be had offline, a GPU recipe on a machine without one, a
cache built with other parameters."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO, hydra_config, writable_copy

RSNA = ["experiment=rsna", "progress=false"]


def _entries(cache: Path) -> dict[str, int]:
    """Cache entry → its meta.json's mtime (a rebuilt entry gets a new one)."""
    return {p.parent.name: p.stat().st_mtime_ns for p in cache.glob("*/meta.json")}


@pytest.fixture(scope="module")
def sharded_smoke(tiny_root, tmp_path_factory):
    """A copy of the tiny folder without its cache; the cache built by one sweep of two shard jobs through
    Hydra's submitit launcher (its local executor: the SLURM one, launcher=slurm_cpu, submits the same
    jobs to a cluster); then ``python -m cervspine.pipeline experiment=rsna smoke=true`` on it."""
    from cervspine.pipeline import run

    tmp = tmp_path_factory.mktemp("rsna_smoke")
    root = writable_copy(tiny_root, tmp / "folder", ".cervspine_cache")
    sweep = [sys.executable, "-m", "cervspine.pipeline", "-m", f"data.root={root}", *RSNA, "smoke=true",
             "shards=2", "shard=range(2)", "hydra/launcher=submitit_local",
             f"hydra.sweep.dir={tmp / 'sweep'}"]  # fmt: skip
    proc = subprocess.run(sweep, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = sorted((tmp / "sweep" / ".submitit").glob("*/*_0_log.out"))
    shards = [line for log in logs for line in log.read_text().splitlines() if line.startswith("cache shard")]
    cache = root / ".cervspine_cache" / "s64"
    built = _entries(cache)
    started = time.perf_counter()
    with hydra_config("pipeline", [f"data.root={root}", *RSNA, "smoke=true"], tmp / "run") as cfg:
        smoke_cfg = cfg.copy()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            result = run(cfg)
    return {
        "root": root, "shards": shards, "built": built, "after": _entries(cache), "result": result,
        "seconds": time.perf_counter() - started, "cfg": smoke_cfg, "run_dir": tmp / "run",
        "printed": printed.getvalue(),
    }  # fmt: skip


def test_a_sweep_of_shard_jobs_builds_the_whole_cache_once(sharded_smoke, tiny_root):
    cache = sharded_smoke["root"] / ".cervspine_cache" / "s64"
    n_studies = sum(1 for d in ("train_images", "test_images") for _ in (tiny_root / d).iterdir())
    assert sorted(sharded_smoke["shards"]) == [
        f"cache shard 0/2: {(n_studies + 1) // 2} built, 0 current in {cache}",
        f"cache shard 1/2: {n_studies // 2} built, 0 current in {cache}",
    ]
    studies = {p.name for d in ("train_images", "test_images") for p in (tiny_root / d).iterdir()}
    assert set(sharded_smoke["built"]) == studies


@pytest.mark.parametrize(
    ("shard", "shards", "expected"),
    [(None, None, None), ("3/8", None, "3/8"), (3, 8, "3/8"), ("0/1", None, "0/1"), ("8/8", None, "error"),
     ("3", None, "error"), (None, 8, "error"), ("a/b", None, "error"), (9, 8, "error")],
)  # fmt: skip
def test_shard_is_i_of_n(shard, shards, expected):
    from omegaconf import OmegaConf

    from cervspine.io.errors import CervspineInputError
    from cervspine.jobs.pipeline import shard_of

    cfg = OmegaConf.create({"shard": shard, "shards": shards})
    if expected == "error":
        with pytest.raises(CervspineInputError, match="shard=i"):
            shard_of(cfg)
    else:
        assert shard_of(cfg) == expected


def test_the_slurm_cpu_launcher_runs_one_cpu_task_per_shard(tmp_path):
    """launcher=slurm_cpu composes (submitit's SLURM launcher) with the job's preprocessing processes."""
    from hydra import compose, initialize_config_dir

    from cervspine.config import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("pipeline", ["launcher=slurm_cpu", "experiment=rsna", "shards=4", "shard=0"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.cpus_per_task) == (0, 1, cfg.workers)


def test_the_pipeline_scores_from_the_cache_the_shards_built(sharded_smoke):
    """The pipeline's cache folder and parameters are the preprocess entry point's: nothing rebuilt."""
    assert sharded_smoke["after"] == sharded_smoke["built"]


def test_smoke_run_of_the_rsna_job_ends_with_a_submission_and_a_report(sharded_smoke):
    result, root = sharded_smoke["result"], sharded_smoke["root"]
    run_dir = sharded_smoke["run_dir"]
    assert result["submission"] == run_dir / "submission.csv"
    sub, test = pd.read_csv(result["submission"]), pd.read_csv(root / "test.csv")
    assert sub["row_id"].tolist() == test["row_id"].tolist() and list(sub.columns) == ["row_id", "fractured"]
    assert ((sub["fractured"] > 0) & (sub["fractured"] < 1)).all()
    assert result["report"] == run_dir / "report" / "report.html" and result["report"].stat().st_size > 1000
    # the job's own stages, shrunk: stage 1 the column model, stage 2 the sequence model + the slice member
    for stage, recipe in [("stage1", "vertebrae_column"), ("stage2", "fracture_seq"),
                          ("stage2_slice", "fracture_b5")]:  # fmt: skip
        resolved = OmegaConf.load(run_dir / stage / "resolved_config.yaml")
        assert resolved.experiment_name == recipe and resolved.trainer.accelerator == "cpu"
        assert resolved.model.backbone.pretrained is False
    assert result["metrics"]["stage2_ckpt"] and len(result["metrics"]["stage2_ckpt"]) == 2
    print(f"smoke run: {sharded_smoke['seconds']:.1f} s")
    assert sharded_smoke["seconds"] < 180  # ~45 s on 2 cores; a run that grew is a smoke test no more


def test_the_smoke_run_prints_the_report_and_submission_paths(sharded_smoke):
    printed, run_dir = sharded_smoke["printed"], sharded_smoke["run_dir"]
    assert f"report:     {run_dir / 'report' / 'report.html'}" in printed
    assert f"submission: {run_dir / 'submission.csv'}" in printed


def test_smoke_keeps_the_job_and_shrinks_it(sharded_smoke):
    cfg = sharded_smoke["cfg"]
    assert cfg.experiment_name == "rsna" and cfg.smoke is True
    assert cfg.stage1.experiment == "vertebrae_column" and cfg.stage2.experiment == "fracture_seq"
    assert cfg.stage2_ensemble.slice.experiment == "fracture_b5"


# ------------------------------------------------------------------- failing in seconds, before any work


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TIMM_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    return env


def test_offline_pretrained_weights_stop_the_rsna_job_in_seconds(tiny_root, tmp_path):
    """``python -m cervspine.pipeline experiment=rsna`` on a machine whose hub is off and whose caches are
    empty: exit 1 within seconds (most of them imports), naming both ways out; nothing preprocessed."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "cervspine.pipeline", f"data.root={tiny_root}", *RSNA,
           'stages_overrides=["trainer=cpu"]', f"data.cache_dir={cache}",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=REPO, env=_offline_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert "model.backbone.weights_path=" in err and "model.backbone.pretrained=false" in err, err[-2000:]
    assert "stage1" in err and "stage1.overrides" in err  # which stage, and where the override goes
    assert not cache.exists()
    assert seconds < 110, seconds  # ~12 s here, most of it imports (a loaded 2-core box: ~40 s)


def test_offline_the_rsna_job_stops_within_seconds_of_starting(tiny_root, empty_hub_cache, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """The same in process, timed from the call: composing every stage and asking for its weights."""
    from cervspine.models.backbones import PretrainedWeightsUnavailable
    from cervspine.pipeline import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = [f"data.root={tiny_root}", *RSNA, 'stages_overrides=["trainer=cpu"]',
                 f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    with hydra_config("pipeline", overrides, tmp_path / "run") as cfg:
        started = time.perf_counter()
        with pytest.raises(PretrainedWeightsUnavailable, match="model.backbone.pretrained=false"):
            run(cfg)
        assert time.perf_counter() - started < 20  # ~2-5 s: composing the three stages, asking the hub


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No cached weights anywhere (the Hugging Face and torch hub caches point at empty folders)."""
    import torch
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    for key in ("HF_HUB_OFFLINE", "TIMM_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


@pytest.fixture
def silent_hub(monkeypatch):
    """A hub that accepts connections and never answers (the worst network: no refusal, no reply)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "no answer"])
def test_pretrained_weights_unavailable_fail_fast_never_random_init(network, empty_hub_cache, request,
                                                                    monkeypatch):  # fmt: skip
    from cervspine.models.backbones import HUB_TIMEOUT_S, PretrainedWeightsUnavailable, create_backbone

    if network == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        request.getfixturevalue("silent_hub")
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable) as e:
        create_backbone("efficientnet_b0", in_chans=3, pretrained=True)
    assert time.perf_counter() - started < HUB_TIMEOUT_S + 2
    said = str(e.value)
    assert "model.backbone.weights_path=" in said and "model.backbone.pretrained=false" in said
    assert (
        "HF_HUB_OFFLINE is set" if network == "HF_HUB_OFFLINE" else "cannot be downloaded from here"
    ) in said


def test_pretrained_weights_from_the_local_cache_need_no_network(empty_hub_cache, monkeypatch):
    """Weights in the hub cache are found offline (and used: not timm's random init)."""
    import timm
    import torch
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from cervspine.models.backbones import create_backbone, pretrained_source

    name = "test_efficientnet"
    repo = timm.models.get_pretrained_cfg(name).hf_hub_id.partition("@")[0]
    home = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    snapshot = home / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (home / "refs").mkdir()
    (home / "refs" / "main").write_text("abc123")
    reference = timm.create_model(name, pretrained=False, num_classes=0)
    torch.nn.init.constant_(next(reference.parameters()), 0.125)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pretrained_source(name) == str(snapshot / "model.safetensors")
    model = create_backbone(name, in_chans=3, pretrained=True)
    assert torch.equal(next(model.parameters()), next(reference.parameters()))


# -------------------------------------------------------------------------------------------- no GPU


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_a_gpu_recipe_without_a_gpu_stops_before_preprocessing(no_cuda, tiny_root, tmp_path):
    from cervspine.pipeline import run
    from cervspine.training.fit import NoGpuError

    cache = tmp_path / "cache"
    overrides = [f"data.root={tiny_root}", *RSNA, f"data.cache_dir={cache}"]
    with hydra_config("pipeline", overrides, tmp_path / "run") as cfg, pytest.raises(NoGpuError) as e:
        run(cfg)
    said = str(e.value)
    assert "trainer=cpu" in said and "stage1.overrides" in said and "smoke=true" in said
    assert not cache.exists()


def test_a_gpu_train_recipe_without_a_gpu_names_trainer_cpu(no_cuda, tiny_root, tmp_path):
    from cervspine.train import train
    from cervspine.training.fit import NoGpuError

    overrides = ["experiment=fracture_b5", f"data.root={tiny_root}", "print_config=false"]
    with hydra_config("train", overrides, tmp_path) as cfg, pytest.raises(NoGpuError, match="trainer=cpu"):
        train(cfg)
    assert not (tmp_path / "run_info.json").exists()


def test_more_devices_than_the_machine_has_names_the_count(monkeypatch, tiny_root, tmp_path):
    import torch

    from cervspine.pipeline import run
    from cervspine.training.fit import NoGpuError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    overrides = [f"data.root={tiny_root}", *RSNA, 'stages_overrides=["trainer=ddp","trainer.devices=4"]',
                 f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    with hydra_config("pipeline", overrides, tmp_path / "run") as cfg, pytest.raises(NoGpuError) as e:
        run(cfg)
    assert "trainer.devices=4" in str(e.value) and "trainer.devices=1" in str(e.value)


# ----------------------------------------------------------------------------- a cache of other params


def test_check_cache_params_refuses_a_cache_of_other_parameters(tiny_cache):
    from cervspine.cache import CacheParams
    from cervspine.io.errors import CervspineInputError
    from cervspine.jobs.pipeline import check_cache_params

    check_cache_params(tiny_cache, CacheParams(image_size=64))  # the parameters it was built with
    check_cache_params(tiny_cache.parent / "missing", CacheParams(image_size=32))  # nothing built yet
    with pytest.raises(CervspineInputError) as e:
        check_cache_params(tiny_cache, CacheParams(image_size=32))
    said = str(e.value)
    assert "image_size=64 (this run: 32)" in said and f"data.cache_dir={tiny_cache}" in said
    assert "data.image_size=" in said


def test_the_pipeline_refuses_a_cache_of_other_parameters_before_touching_it(tiny_root, tiny_cache, tmp_path):
    """The tiny cache (segmentation_method=auto) given to a run asking for geometry: refused, unchanged
    (the shared folder's snapshot check fails the test on any write)."""
    from cervspine.io.errors import CervspineInputError
    from cervspine.pipeline import run

    overrides = [f"data.root={tiny_root}", *RSNA, "smoke=true", f"data.cache_dir={tiny_cache}",
                 "data.segmentation_method=geometry"]  # fmt: skip
    with (
        hydra_config("pipeline", overrides, tmp_path / "run") as cfg,
        pytest.raises(CervspineInputError) as e,
    ):
        run(cfg)
    assert "segmentation_method='auto' (this run: 'geometry')" in str(e.value)
    assert not (tmp_path / "run" / "stage1").exists()


def test_weights_files_are_checked_before_preprocessing(tiny_root, tmp_path):
    """A missing weights file, and one of another architecture, stop the job before the cache is touched."""
    import timm
    import torch

    from cervspine.models.backbones import WeightsMismatch
    from cervspine.pipeline import run

    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), other)
    cache = tmp_path / "cache"
    for path, error, said in [(tmp_path / "missing.pth", FileNotFoundError, "not found"),
                              (other, WeightsMismatch, "does not fit backbone efficientnet_b0")]:  # fmt: skip
        stages = f'stages_overrides=["trainer=cpu","model.backbone.weights_path={path}"]'
        overrides = [f"data.root={tiny_root}", *RSNA, stages, f"data.cache_dir={cache}"]
        with hydra_config("pipeline", overrides, tmp_path / "run") as cfg, pytest.raises(error) as e:
            run(cfg)
        assert said in str(e.value) and str(e.value).startswith("stage1 (vertebrae_column)")
    assert not cache.exists()


def test_several_nodes_per_stage_are_refused_naming_the_train_command(tiny_root, tmp_path):
    from cervspine.io.errors import CervspineInputError as InputError
    from cervspine.pipeline import run

    stages = 'stages_overrides=["trainer=cpu","++trainer.num_nodes=2"]'
    overrides = [f"data.root={tiny_root}", *RSNA, stages, f"data.cache_dir={tmp_path / 'c'}"]
    with hydra_config("pipeline", overrides, tmp_path / "run") as cfg, pytest.raises(InputError) as e:
        run(cfg)
    assert "python -m cervspine.train -m launcher=slurm experiment=vertebrae_column" in str(e.value)
