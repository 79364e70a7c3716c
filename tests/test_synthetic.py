"""The synthetic RSNA generator: exact round trips through the readers, CSV consistency, determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from cervspine import TARGETS, VERTEBRAE
from cervspine.io import load_segmentation, load_study
from cervspine.io.rsna import RsnaIndex
from cervspine.synthetic import (
    PAD_HU,
    TRANSFER_SYNTAXES,
    FolderSpec,
    PhantomParams,
    SyntheticStudy,
    file_numbers,
    make_phantom,
    plan_folder,
    write_rsna_folder,
    write_segmentation_nifti,
    write_study_dicom,
)

PIXELS = {  # name: (signed, intercept, bits_stored)
    "signed_m1024": (True, -1024, 16),
    "signed_0": (True, 0, 16),
    "unsigned": (False, -1024, 16),
    "unsigned_12bit": (False, -1024, 12),
}
SMALL = dict(size=32, slices=(12, 16), spacing=(1.0, 1.25))


@pytest.fixture(scope="module")
def tiny() -> SyntheticStudy:
    return make_phantom(5, PhantomParams(size=32, n_slices=10, slice_spacing=1.25, fractured=("C2",)))


@pytest.fixture(scope="module")
def phantom() -> SyntheticStudy:
    return make_phantom(3, PhantomParams(size=64, n_slices=48, slice_spacing=1.0, fractured=("C2", "C6")))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rsna")
    summary = write_rsna_folder(out, n_train=8, n_test=2, seed=11, **SMALL)
    return out, summary


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("first_number", [1, 37])
@pytest.mark.parametrize("pixels", sorted(PIXELS))
@pytest.mark.parametrize("reversed_", [False, True])
@pytest.mark.parametrize("ts", sorted(TRANSFER_SYNTAXES))
def test_dicom_round_trip(
    tiny: SyntheticStudy, tmp_path: Path, ts: str, reversed_: bool, pixels: str, first_number: int
) -> None:
    signed, intercept, bits = PIXELS[pixels]
    paths = write_study_dicom(
        tiny,
        tmp_path / tiny.uid,
        transfer_syntax=ts,
        reversed=reversed_,
        first_number=first_number,
        signed=signed,
        intercept=intercept,
        bits_stored=bits,
    )
    study = load_study(tmp_path / tiny.uid)
    np.testing.assert_array_equal(study.volume, tiny.volume)
    assert study.stored_reversed == reversed_
    expected = file_numbers(len(paths), reversed=reversed_, first_number=first_number)
    np.testing.assert_array_equal(study.instance_numbers, expected)
    assert [p.name for p in paths] == [f"{n}.dcm" for n in expected]
    np.testing.assert_allclose(study.z_positions, tiny.z_positions, atol=1e-3)
    np.testing.assert_allclose(study.spacing, tiny.spacing, rtol=1e-4)
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[ts]
    assert (ds.Modality, ds.PixelRepresentation, ds.BitsStored, ds.RescaleIntercept) == (
        "CT",
        signed,
        bits,
        intercept,
    )
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.StudyInstanceUID == tiny.uid


@pytest.mark.parametrize("ts", ["explicit", "jpeg_lossless"])
def test_fov_padding_round_trip(tmp_path: Path, ts: str) -> None:
    study = make_phantom(2, PhantomParams(size=32, n_slices=8, fov_mask=True))
    assert study.volume[:, 0, 0].tolist() == [PAD_HU] * 8
    write_study_dicom(study, tmp_path / "s", transfer_syntax=ts, signed=True, intercept=-1024)
    np.testing.assert_array_equal(load_study(tmp_path / "s").volume, study.volume)
    with pytest.raises(ValueError, match="does not fit"):
        write_study_dicom(study, tmp_path / "u", signed=False)


@pytest.mark.parametrize("reversed_", [False, True])
def test_segmentation_round_trip(tiny: SyntheticStudy, tmp_path: Path, reversed_: bool) -> None:
    write_study_dicom(tiny, tmp_path / "s", reversed=reversed_, first_number=5)
    nii = write_segmentation_nifti(tiny, tmp_path / "s.nii", reversed=reversed_)
    study = load_study(tmp_path / "s")
    seg = load_segmentation(nii, study)
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, tiny.labels)
    # the community recipe gives the slices in file-number order
    img = nib.load(nii)
    data = np.asarray(img.dataobj)
    assert data.shape == tiny.labels.shape[::-1] and data.dtype == np.uint8
    file_order = tiny.labels[::-1] if reversed_ else tiny.labels
    np.testing.assert_array_equal(data[:, ::-1, ::-1].transpose(2, 1, 0), file_order)
    # voxel (0, 0, 0) is column 0, row H-1 of the highest-numbered slice, in RAS
    z, h, _ = tiny.labels.shape
    last = study.positions[int(np.argmax(study.instance_numbers))]
    lps = last + (h - 1) * study.spacing[1] * np.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(img.affine[:3, 3], lps * [-1, -1, 1], atol=1e-4)
    np.testing.assert_allclose(np.diag(img.affine)[:2], [-tiny.spacing[2], tiny.spacing[1]], rtol=1e-6)


def test_segmentation_noise_is_optional(phantom: SyntheticStudy, tmp_path: Path) -> None:
    noisy = write_segmentation_nifti(phantom, tmp_path / "n.nii", noise=1.0, rng=np.random.default_rng(0))
    data = np.asarray(nib.load(noisy).dataobj)[:, ::-1, ::-1].transpose(2, 1, 0)
    agree = (data == phantom.labels)[phantom.labels > 0].mean()
    assert 0.6 < agree < 0.99  # boundaries moved, vertebrae still there


# ------------------------------------------------------------------------------------------------ phantom


def test_anatomy_is_plausible(phantom: SyntheticStudy) -> None:
    vol, lab = phantom.volume, phantom.labels
    assert vol.dtype == np.int16 and lab.dtype == np.uint8 and vol.shape == lab.shape == (48, 64, 64)
    assert np.all(np.diff(phantom.z_positions) < 0)
    centres = [np.flatnonzero((lab == k).any(axis=(1, 2))).mean() for k in range(1, 8)]
    assert np.all(np.diff(centres) > 0), "C1..C7 must run superior → inferior"
    assert vol[:, :3, :3].mean() < -900  # air in the corners
    bone = vol[lab > 0]
    assert np.percentile(bone, 90) > 500 and 100 < np.median(bone) < 900
    cols = np.flatnonzero(np.isin(lab, range(3, 8)).any(axis=(0, 1)))
    assert 0.12 < (cols[-1] - cols[0] + 1) / 64 < 0.4  # spine ~15–25 % of the field of view
    soft = vol[32, 10:54, 10:54]
    assert (np.abs(soft - 45) < 80).mean() > 0.3  # mostly soft tissue around the spine


def test_fracture_is_visible_and_local(phantom: SyntheticStudy) -> None:
    intact = make_phantom(3, PhantomParams(size=64, n_slices=48, slice_spacing=1.0, fractured=()))
    diff = phantom.volume.astype(np.int32) - intact.volume
    changed = diff != 0
    near = np.isin(phantom.labels, [2, 6]) | np.isin(intact.labels, [2, 6])
    assert changed.any() and not (changed & ~_dilate(near, 2)).any()
    other = ~np.isin(phantom.labels, [2, 6]) & ~np.isin(intact.labels, [2, 6])
    np.testing.assert_array_equal(phantom.labels[other], intact.labels[other])
    assert {b.vertebra for b in phantom.boxes} == {"C2", "C6"}
    for b in phantom.boxes:
        region = np.s_[b.slice_index, b.y : b.y + b.height, b.x : b.x + b.width]
        assert np.abs(diff[region]).max() > 150  # a gap or a step of bone vs soft tissue
        assert (phantom.labels[region] == VERTEBRAE.index(b.vertebra) + 1).any()
    assert intact.boxes == [] and intact.targets()["patient_overall"] == 0
    assert phantom.targets() == {**{v: int(v in ("C2", "C6")) for v in VERTEBRAE}, "patient_overall": 1}


def _dilate(mask: np.ndarray, n: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=n)


def test_phantom_is_deterministic() -> None:
    """Same seed, same volume; another seed, another (its speed: experiments/benchmarks/synthetic.py)."""
    params = PhantomParams(size=128, n_slices=120, slice_spacing=0.625, fractured=("C7",))
    a = make_phantom(9, params)
    b = make_phantom(9, params)
    np.testing.assert_array_equal(a.volume, b.volume)
    assert not np.array_equal(a.volume, make_phantom(10, params).volume)


def test_rejects_unknown_vertebra() -> None:
    with pytest.raises(ValueError, match="C1..C7"):
        make_phantom(0, PhantomParams(fractured=("T1",)))


# ------------------------------------------------------------------------------------------------- folder


def test_folder_layout(folder: tuple[Path, dict]) -> None:
    out, summary = folder
    train = pd.read_csv(out / "train.csv")
    test_labels = pd.read_csv(out / "test_labels.csv")
    assert list(train.columns) == ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
    assert len(train) == summary["n_train"] == 8 and len(test_labels) == 2
    assert list(test_labels.columns) == list(train.columns)
    for df in (train, test_labels):
        assert (df["patient_overall"] == df[list(VERTEBRAE)].max(axis=1)).all()
        assert df["StudyInstanceUID"].str.fullmatch(r"1\.2\.826\.0\.1\.3680043\.\d+").all()
    assert sorted(p.name for p in (out / "train_images").iterdir()) == sorted(train["StudyInstanceUID"])
    assert sorted(p.name for p in (out / "test_images").iterdir()) == sorted(test_labels["StudyInstanceUID"])
    test = pd.read_csv(out / "test.csv")
    assert list(test.columns) == ["row_id", "StudyInstanceUID", "prediction_type"]
    assert (test.groupby("StudyInstanceUID").size() == 8).all() and len(test) == 16
    assert set(test["prediction_type"]) == set(TARGETS)
    assert (test["row_id"] == test["StudyInstanceUID"] + "_" + test["prediction_type"]).all()
    sub = pd.read_csv(out / "sample_submission.csv")
    assert list(sub.columns) == ["row_id", "fractured"] and (sub["row_id"] == test["row_id"]).all()
    assert (sub["fractured"] == 0.5).all()
    segs = sorted(p.stem for p in (out / "segmentations").glob("*.nii"))
    assert len(segs) == summary["n_segmentations"] == 4 and set(segs) <= set(train["StudyInstanceUID"])


def test_folder_boxes(folder: tuple[Path, dict]) -> None:
    out, summary = folder
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    train = pd.read_csv(out / "train.csv").set_index("StudyInstanceUID")
    assert list(boxes.columns) == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert len(boxes) == summary["n_boxes"] > 0
    assert boxes["StudyInstanceUID"].nunique() == summary["n_box_studies"] == 2
    assert (train.loc[boxes["StudyInstanceUID"], "patient_overall"] == 1).all()
    assert (boxes[["x", "y"]] >= 0).all().all() and (boxes[["width", "height"]] > 0).all().all()
    assert ((boxes["x"] + boxes["width"]) <= SMALL["size"]).all()
    assert ((boxes["y"] + boxes["height"]) <= SMALL["size"]).all()
    for uid, rows in boxes.groupby("StudyInstanceUID"):
        files = {int(p.stem) for p in (out / "train_images" / uid).glob("*.dcm")}
        assert set(rows["slice_number"]) <= files
    index = RsnaIndex.from_root(out)  # the project's own reader accepts the folder
    index.check_box_slices()
    assert index.summary()["n_with_segmentation"] == summary["n_segmentations"]


def test_folder_matches_manifest_and_readers(folder: tuple[Path, dict]) -> None:
    out, _ = folder
    manifest = pd.read_csv(out / "synthetic_manifest.csv")
    for row in manifest.itertuples():
        study = load_study(out / f"{row.split}_images" / row.StudyInstanceUID)
        assert study.stored_reversed == row.reversed
        assert study.instance_numbers.min() == row.first_number and study.shape[0] == row.n_slices
        ds = pydicom.dcmread(next((out / f"{row.split}_images" / row.StudyInstanceUID).glob("*.dcm")))
        assert ds.file_meta.TransferSyntaxUID == row.transfer_syntax_uid
        if row.segmentation:
            seg = load_segmentation(out / "segmentations" / f"{row.StudyInstanceUID}.nii", study)
            present = {VERTEBRAE[k - 1] for k in np.unique(seg) if 1 <= k <= 7}
            assert present == set(VERTEBRAE)


def test_refuses_to_mix_with_earlier_output(folder: tuple[Path, dict], tiny: SyntheticStudy) -> None:
    out, _ = folder
    with pytest.raises(FileExistsError, match="overwrite"):
        write_rsna_folder(out, n_train=1, n_test=0, **SMALL)
    uid_dir = next((out / "train_images").iterdir())
    with pytest.raises(FileExistsError, match="overwrite"):
        write_study_dicom(tiny, uid_dir)


def test_folder_is_deterministic(tmp_path: Path) -> None:
    a = write_rsna_folder(tmp_path / "a", n_train=3, n_test=1, seed=4, **SMALL)
    b = write_rsna_folder(tmp_path / "b", n_train=3, n_test=1, seed=4, **SMALL)
    write_rsna_folder(tmp_path / "c", n_train=3, n_test=1, seed=5, **SMALL)
    assert a["n_files"] == b["n_files"] > 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "train.csv").read_bytes() != (tmp_path / "c" / "train.csv").read_bytes()


@pytest.mark.parametrize("ts", sorted(TRANSFER_SYNTAXES))
def test_dicom_bytes_are_deterministic(tiny: SyntheticStudy, tmp_path: Path, ts: str) -> None:
    a = write_study_dicom(tiny, tmp_path / "a", transfer_syntax=ts, signed=False)
    b = write_study_dicom(tiny, tmp_path / "b", transfer_syntax=ts, signed=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_parallel_writing_gives_the_same_folder(tmp_path: Path) -> None:
    write_rsna_folder(tmp_path / "serial", n_train=2, n_test=0, seed=8, **SMALL)
    write_rsna_folder(tmp_path / "parallel", n_train=2, n_test=0, seed=8, workers=2, **SMALL)
    files = [p for p in sorted((tmp_path / "serial").rglob("*")) if p.is_file()]
    assert len(files) > 20
    for path in files:
        twin = tmp_path / "parallel" / path.relative_to(tmp_path / "serial")
        assert path.read_bytes() == twin.read_bytes(), path


def test_label_statistics_over_a_large_plan() -> None:
    plans = plan_folder(FolderSpec(n_train=600, n_test=0, size=64, slices=(20, 30)))
    fractured = [p.params.fractured for p in plans]
    assert 0.44 < np.mean([bool(f) for f in fractured]) < 0.52
    counts = {v: sum(v in f for f in fractured) for v in VERTEBRAE}
    assert sorted(counts, key=counts.get)[-2:] in (["C2", "C7"], ["C7", "C2"], ["C6", "C7"])
    assert max(len(f) for f in fractured) >= 3
    assert 0.2 < np.mean([p.options.reversed for p in plans]) < 0.4
    assert 0.2 < np.mean([p.options.first_number > 1 for p in plans]) < 0.4
    ts = pd.Series([p.options.transfer_syntax for p in plans]).value_counts(normalize=True)
    assert 0.22 < ts["jpeg_lossless"] < 0.38 and set(ts.index) == set(TRANSFER_SYNTAXES)
    assert all(p.boxes <= bool(p.params.fractured) for p in plans)


def test_cli_writes_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cervspine.synthesize", f"out={out}", "n_train=2", "n_test=1", "size=24"]
    cmd += ["slices=[8,10]", "seed=1", "quirks.reversed=1.0"]
    cmd += [f"quirks.transfer_syntax.{ts}=0" for ts in TRANSFER_SYNTAXES if ts != "rle"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    assert len(pd.read_csv(out / "train.csv")) == 2 and len(pd.read_csv(out / "test.csv")) == 8
    manifest = pd.read_csv(out / "synthetic_manifest.csv")
    assert (manifest["transfer_syntax"] == "rle").all() and manifest["reversed"].all()
    assert (out / ".hydra_synthesize" / ".hydra" / "config.yaml").exists()


def test_synthetic_uids_avoid_the_known_bad_rsna_studies():
    from cervspine.io.rsna import KNOWN_BAD_STUDIES
    from cervspine.synthetic.plan import _uids

    class Draws:  # the generator's draw that once put 1.2.826.0.1.3680043.20574 in a held-out folder
        def choice(self, pool, size, replace):
            return np.array([19574, 5, 28952])[:size]

    uids = _uids(Draws(), 3)
    assert not set(uids) & set(KNOWN_BAD_STUDIES)
    assert len(set(uids)) == 3 and uids[1] == "1.2.826.0.1.3680043.1005"  # the others are kept
