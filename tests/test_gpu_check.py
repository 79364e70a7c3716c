"""``make gpu-check`` on a machine without a GPU: it starts, composes every real recipe as a GPU run would
train it, and stops with a clear "no GPU" line, writing nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: it would run for real")


def test_the_gpu_check_dry_run_composes_and_stops_saying_no_gpu(tmp_path):
    cmd = [sys.executable, "-m", "experiments.benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "gpu-check: 4 recipes composed" in out
    for recipe in ("vertebrae_column", "fracture_seq", "fracture_b5", "vertebrae_b5"):
        assert recipe in out
    assert out.count("bf16-mixed") == 4  # the recipes' own GPU trainer, not trainer=cpu
    assert any(line.startswith("gpu-check: no GPU") for line in out.splitlines())
    assert not any(tmp_path.iterdir())


def test_without_dry_run_no_gpu_is_a_failure_not_a_pass(tmp_path):
    from experiments.benchmarks.gpu_check import main

    assert main(["--out", str(tmp_path), "--recipes", "fracture_b5"]) == 2
    assert not any(tmp_path.iterdir())


def test_the_make_target_runs_the_script_offline():
    text = (REPO / "Makefile").read_text()
    target = text[text.index("\ngpu-check:") :].split("\n\n")[0]
    assert "experiments.benchmarks.gpu_check" in target and "HF_HUB_OFFLINE=1" in target
