"""Predict on hostile input: never a partial submission.csv; every row of test.csv always written, a study
that cannot be scored answered with the training prior and listed in failures.csv (``strict=true``: a
non-zero exit naming the studies, no submission).

Each case and its expected outcome is listed in docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
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


EMPTY, MR = "1.2.826.0.1.3680043.99998", "1.2.826.0.1.3680043.99997"


def _rows(uid: str) -> pd.DataFrame:
    return pd.DataFrame({"row_id": [f"{uid}_{t}" for t in TARGETS], "StudyInstanceUID": uid,
                         "prediction_type": list(TARGETS)})  # fmt: skip


def _hostile_root(tiny_root: Path, dst: Path) -> tuple[Path, dict[str, str]]:
    """tiny_root's copy whose test.csv names one good study and four broken ones (uid → what is wrong):
    every slice truncated, two series mixed, an empty folder, an MR series."""
    writable_copy(tiny_root, dst, ".cervspine_cache")
    garbage, mixed = sorted(p.name for p in (dst / "test_images").iterdir())
    for f in (dst / "test_images" / garbage).iterdir():
        f.write_bytes(f.read_bytes()[:100])  # every slice truncated inside its header
    write_series(dst / "test_images" / mixed, n=3, shape=(64, 64), names=["x1.dcm", "x2.dcm", "x3.dcm"])
    (dst / "test_images" / EMPTY).mkdir()
    write_series(dst / "test_images" / MR, n=4, shape=(64, 64), modality="MR")
    shutil.copytree(next((dst / "train_images").iterdir()), dst / "test_images" / GOOD)
    test = pd.read_csv(dst / "test.csv", dtype=str)
    pd.concat([test, _rows(GOOD), _rows(EMPTY), _rows(MR)]).to_csv(dst / "test.csv", index=False)
    broken = {garbage: "no readable DICOM slice", mixed: "2 series", EMPTY: "no", MR: "Modality 'MR'"}
    return dst, broken


def _predict_cli(root: Path, run: Path, out: Path, *more: str) -> subprocess.CompletedProcess:
    args = [f"data.root={root}", f"run_dir={run}", f"hydra.run.dir={out}", "data.image_size=64", "workers=1"]
    args += list(more)
    return subprocess.run(
        [sys.executable, "-m", "cervspine.predict", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_predict_cli_answers_broken_test_studies_with_the_prior_and_lists_them(run_dir, tiny_root, tmp_path):
    """A truncated study, a folder of two series, an empty folder and an MR series beside a good study:
    submission.csv has every row of test.csv, the broken studies' rows the training prior; failures.csv
    and stderr name each with its reason; each one's record says why. strict=true: exit 1, no submission."""
    from cervspine.inference import load_predictor

    root, broken = _hostile_root(tiny_root, tmp_path / "rsna")
    out = tmp_path / "out"
    proc = _predict_cli(root, run_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(broken)} studies not scored, answered with the training prior" in proc.stderr
    for uid, why in broken.items():
        line = next(ln for ln in proc.stderr.splitlines() if ln.strip().startswith(f"{uid}:"))
        assert why in line
    sub = pd.read_csv(out / "submission.csv")
    assert sub["row_id"].tolist() == pd.read_csv(root / "test.csv")["row_id"].tolist()
    prior = load_predictor(run_dir, device="cpu").prior
    for uid in broken:
        rows = sub.set_index("row_id").loc[[f"{uid}_{t}" for t in TARGETS], "fractured"].to_numpy()
        assert rows == pytest.approx(prior, rel=1e-5)
        record = json.loads((out / "studies" / f"{uid}.json").read_text())
        assert record["answered_by"] == "training prior" and broken[uid] in record["not_scored"]
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert sorted(failures["StudyInstanceUID"]) == sorted(broken)
    assert (out / "studies" / f"{GOOD}.json").is_file()  # the good study was scored
    assert "answered_by" not in json.loads((out / "studies" / f"{GOOD}.json").read_text())

    strict = _predict_cli(root, run_dir, tmp_path / "strict", "strict=true")
    assert strict.returncode == 1 and f"{len(broken)} studies could not be scored" in strict.stderr
    assert not (tmp_path / "strict" / "submission.csv").exists()
    assert (tmp_path / "strict" / "studies" / f"{GOOD}.json").is_file()  # the others scored first


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
