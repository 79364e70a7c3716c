"""Predict on hostile input (issue 8): never a partial submission.csv; a non-zero exit naming the studies.

Each case and its expected outcome is listed in docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from cervspine import TARGETS
from tests.helpers import REPO, hydra_config, writable_copy, write_series


@pytest.fixture(scope="module")
def run_dir(shared_run) -> Path:
    """A pipeline run folder (stage1/, stage2/, stage2_seq/) with tiny trained stages: the shared run."""
    return shared_run.dir


GOOD = "1.2.826.0.1.3680043.99999"


def _hostile_root(tiny_root: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """tiny_root's copy whose test.csv names one good study and two broken ones (uid → what is wrong)."""
    writable_copy(tiny_root, dst, ".cervspine_cache")
    garbage, mixed = sorted(p.name for p in (dst / "test_images").iterdir())
    for f in (dst / "test_images" / garbage).iterdir():
        f.write_bytes(f.read_bytes()[:100])  # every slice truncated inside its header
    write_series(dst / "test_images" / mixed, n=3, shape=(64, 64), names=["x1.dcm", "x2.dcm", "x3.dcm"])
    shutil.copytree(next((dst / "train_images").iterdir()), dst / "test_images" / GOOD)
    test = pd.read_csv(dst / "test.csv", dtype=str)
    good = pd.DataFrame({"row_id": [f"{GOOD}_{t}" for t in TARGETS], "StudyInstanceUID": GOOD,
                         "prediction_type": list(TARGETS)})  # fmt: skip
    pd.concat([test, good]).to_csv(dst / "test.csv", index=False)
    return dst, {garbage: "no readable DICOM slice", mixed: "2 series"}


def _predict_cli(root: Path, run: Path, out: Path) -> subprocess.CompletedProcess:
    args = [f"data.root={root}", f"run_dir={run}", f"hydra.run.dir={out}", "data.image_size=64", "workers=1"]
    return subprocess.run(
        [sys.executable, "-m", "cervspine.predict", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_predict_cli_on_broken_test_studies_exits_nonzero_and_writes_no_submission(
    run_dir, tiny_root, tmp_path
):
    root, broken = _hostile_root(tiny_root, tmp_path / "rsna")
    out = tmp_path / "out"
    proc = _predict_cli(root, run_dir, out)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"submission.csv NOT written: {len(broken)} studies could not be scored" in proc.stderr
    for uid, why in broken.items():
        line = next(ln for ln in proc.stderr.splitlines() if ln.strip().startswith(f"{uid}:"))
        assert why in line
    assert not [p.name for p in out.iterdir() if "submission" in p.name]  # not even a temp file
    assert (out / "studies" / f"{GOOD}.json").is_file()  # the good study was still scored


def test_predict_on_a_full_disk_writes_no_partial_submission(run_dir, tiny_root, tmp_path, monkeypatch):
    from cervspine.predict import predict_folder

    real_to_csv = pd.DataFrame.to_csv

    def to_csv(self, handle, *args, **kwargs):
        real_to_csv(self.head(3), handle, *args, **kwargs)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    overrides = [f"data.root={tiny_root}", f"run_dir={run_dir}", "data.image_size=64", "workers=1"]
    with hydra_config("predict", overrides, tmp_path / "out") as cfg:
        monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
        with pytest.raises(OSError) as err:
            predict_folder(cfg)
    assert err.value.errno == errno.ENOSPC
    assert not [p.name for p in (tmp_path / "out").iterdir() if "submission" in p.name]
