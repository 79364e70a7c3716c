"""Hostile inputs (issue 8): each gets a clear error naming the file, or the documented tolerant behaviour.

Only the cases no other test covers live here; docs/reliability.md lists every case with its test id.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cervspine.cache import CachedStudy, CacheParams, build_entry, preprocess
from cervspine.io import CervspineInputError, StudyReadError, load_segmentation, load_study
from cervspine.io.rsna import RsnaIndex
from cervspine.synthetic import write_rsna_folder
from tests.helpers import TINY_DATA, TINY_STAGE2, hydra_config, labels_like, nifti_from_volume, write_series

REPO = Path(__file__).resolve().parents[1]
ODD_DIR = "dir with spaces/données – ü 東京 ✓"  # spaces, accents, CJK, a dash and a symbol


# ----------------------------------------------------------------------------------------- DICOM


def test_an_exact_copy_of_a_slice_names_both_files(tmp_path):
    files, _ = write_series(tmp_path / "s", n=5)
    shutil.copy(files[2], tmp_path / "s" / "3 (copy).dcm")  # same SOP instance, same position
    with pytest.raises(StudyReadError, match="same slice position") as err:
        load_study(tmp_path / "s")
    assert "3.dcm" in str(err.value) and "3 (copy).dcm" in str(err.value)


def test_an_oblique_study_goes_through_the_cache(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    write_series(tmp_path / "s", n=7, shape=(6, 5), dz=2.0, orientation=(c, s, 0.0, -s * 0.8, c * 0.8, -0.6))
    study = load_study(tmp_path / "s")
    seg = labels_like(study, seed=4)
    nii = tmp_path / "seg.nii"
    nib.save(nib.Nifti1Image(*nifti_from_volume(seg, study, (2, 1, 0), (False, True, True))), str(nii))
    entry = CachedStudy(
        build_entry("1.9", tmp_path / "s", nii, tmp_path / "c", CacheParams(image_size=None), "x")
    )
    np.testing.assert_array_equal(entry.volume, study.volume)
    np.testing.assert_array_equal(entry.seg, seg)
    assert entry.meta["z_positions"] == study.z_positions.tolist()


# ----------------------------------------------------------------- paths with spaces and non-ASCII


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory) -> Path:
    """A small RSNA folder under a path with spaces and non-ASCII characters (every study segmented)."""
    root = tmp_path_factory.mktemp("odd") / ODD_DIR / "rsna é"
    write_rsna_folder(root, n_train=3, n_test=1, size=32, slices=(10, 12), seed=2, seg_fraction=1.0)
    return root


def test_a_path_with_spaces_and_non_ascii_reads_and_preprocesses(odd_root, tmp_path):
    index = RsnaIndex.from_root(odd_root)
    assert len(index.train_uids) == 3 and len(index.test_uids) == 1
    uid = index.train_uids[0]
    study = load_study(index.study_dir(uid))
    seg = load_segmentation(index.segmentation_path(uid), study)
    assert seg.shape == study.shape and study.folder == index.study_dir(uid)
    cache = odd_root / "cache ü"
    report = preprocess(index, cache, CacheParams(image_size=16), workers=2, progress=False)
    assert report.ok and len(report.built) == 4
    entry = CachedStudy(cache / uid)
    assert entry.meta["source"] == str(index.study_dir(uid)) and entry.seg is not None


def test_a_path_with_spaces_and_non_ascii_through_the_cli(odd_root, tmp_path):
    # Hydra's override grammar needs non-ASCII values quoted: data.root='...'
    run, cache = odd_root / "run ✓", odd_root / "cli cache"
    args = [
        f"data.root='{odd_root}'",
        f"data.cache_dir='{cache}'",
        f"hydra.run.dir='{run}'",
        "progress=false",
    ]
    proc = subprocess.run([sys.executable, "-m", "cervspine.preprocess", *args, "data.image_size=16"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len([p for p in cache.iterdir() if (p / "meta.json").is_file()]) == 4
    assert (run / "preprocess.log").is_file()


def test_pipeline_stage_configs_accept_a_non_ascii_path(tmp_path):
    from cervspine.jobs.pipeline import stage_config

    root, out = tmp_path / "données", tmp_path / "résultats"
    with hydra_config("pipeline", [f"data.root='{root}'", "experiment=demo"], tmp_path) as cfg:
        stage = stage_config(cfg, "stage1", out)
    assert stage.data.root == str(root) and stage.paths.output_dir == str(out)


# --------------------------------------------------------------------------- empty data folder


@pytest.fixture()
def empty_root(tmp_path) -> Path:
    root = tmp_path / "empty"
    (root / "train_images").mkdir(parents=True)  # folders, but no CSV
    return root


def _entry_points():
    from cervspine.pipeline import run as pipeline_run
    from cervspine.predict import predict_folder
    from cervspine.preprocess import run as preprocess_run
    from cervspine.train import train

    return {
        "preprocess": (preprocess_run, ["progress=false"]),
        "train": (train, ["experiment=fracture_demo", *TINY_DATA, *TINY_STAGE2, "debug=fast_dev_run"]),
        "predict": (predict_folder, ["run_dir=null"]),
        "pipeline": (pipeline_run, ["experiment=demo", "progress=false"]),
    }


@pytest.mark.parametrize("entry_point", ["preprocess", "train", "predict", "pipeline"])
def test_an_empty_data_folder_is_a_clear_error_in_every_entry_point(entry_point, empty_root, tmp_path):
    func, overrides = _entry_points()[entry_point]
    with (
        hydra_config(entry_point, [f"data.root={empty_root}", *overrides], tmp_path / "run") as cfg,
        pytest.raises(CervspineInputError, match="neither train.csv nor test.csv") as err,
    ):
        func(cfg)
    assert str(empty_root) in str(err.value) and "train_images" in str(err.value)


def test_an_empty_data_folder_exits_nonzero_from_the_cli(empty_root, tmp_path):
    args = [f"data.root={empty_root}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false"]
    proc = subprocess.run([sys.executable, "-m", "cervspine.preprocess", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    assert f"RSNA root {empty_root} has neither train.csv nor test.csv" in proc.stderr


# ------------------------------------------------------------------------------------- CSV, NIfTI


@pytest.fixture()
def small_root(tmp_path) -> Path:
    root = tmp_path / "rsna"
    write_rsna_folder(root, n_train=3, n_test=1, size=32, slices=(10, 12), seed=4, seg_fraction=1.0,
                      box_fraction=1.0, positive_fraction=1.0)  # fmt: skip
    return root


def test_duplicated_box_rows_are_tolerated(small_root):
    boxes = pd.read_csv(small_root / "train_bounding_boxes.csv", dtype=str)
    assert len(boxes), "the fixture should have boxes"
    before = RsnaIndex.from_root(small_root).summary()
    pd.concat([boxes, boxes.iloc[:3]]).to_csv(small_root / "train_bounding_boxes.csv", index=False)
    index = RsnaIndex.from_root(small_root)
    assert len(index.boxes) == len(boxes) + 3
    assert index.summary()["n_boxed_slices"] == before["n_boxed_slices"]  # a slice counts once
    index.check_box_slices()


def test_a_segmentation_that_does_not_fit_fails_that_study_only(small_root, tmp_path):
    index = RsnaIndex.from_root(small_root)
    uid = index.train_uids[1]
    nii = index.segmentation_path(uid)
    img = nib.load(str(nii))
    short = np.array(img.dataobj[:, :, 1:])  # a copy: the file is memory-mapped
    nib.save(nib.Nifti1Image(short, img.affine), str(nii))  # one slice short
    report = preprocess(index, tmp_path / "c", CacheParams(image_size=16), workers=1, progress=False)
    assert list(report.failed) == [uid]
    assert "SegmentationError" in report.failed[uid] and str(nii) in report.failed[uid]
    assert len(report.built) == 3 and not (tmp_path / "c" / uid).exists()


def test_a_non_dicom_file_in_a_study_folder_is_ignored_through_preprocess(small_root, tmp_path):
    index = RsnaIndex.from_root(small_root)
    uid = index.test_uids[0]
    (index.study_dir(uid) / "README.txt").write_text("exported by a PACS\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = preprocess(index, tmp_path / "c", CacheParams(image_size=16), workers=1, progress=False)
    assert report.ok
    assert CachedStudy(tmp_path / "c" / uid).meta["metadata"]["ignored_files"] == ["README.txt"]
    assert any("README.txt" in str(w.message) for w in caught)
