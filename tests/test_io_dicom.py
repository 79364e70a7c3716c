"""load_study: decoding real DICOM files, slice ordering, the bad-input policy and worker isolation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    ImplicitVRLittleEndian,
    generate_uid,
)

from cervspine.io import Study, StudyReadError, _fast_header, decode_pool, load_study
from cervspine.io import headers as headers_mod
from cervspine.io.dicom import shutdown_decoders
from tests.helpers import AXIAL, write_series, write_slice

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # some pydicom test files


# ------------------------------------------------------------------------------------------ writers


def real_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return path


def study_from_real(src: str, folder: Path, n: int = 3, modality: str = "CT") -> list[Dataset]:
    """Copies of one real file as a series (new positions/UIDs; pixel data untouched), superior first."""
    folder.mkdir(parents=True, exist_ok=True)
    series, out = generate_uid(), []
    for k in range(n):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some test files carry invalid UIDs
            ds = pydicom.dcmread(src)
        ds.Modality = modality
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - k  # stored reversed on purpose: file 1 is the most inferior
        ds.ImageOrientationPatient = list(AXIAL)
        ds.ImagePositionPatient = [0.0, 0.0, 10.0 - 1.25 * k]
        ds.save_as(folder / f"x{(k * 7) % n}_{k}.dcm", enforce_file_format=False)
        out.append(ds)
    return out


def reference_hu(ds: Dataset) -> np.ndarray:
    """pydicom's own decode with the rescale, in float64."""
    return ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


# ------------------------------------------------------------------------------- real-file decoding

REAL_FILES = [
    "CT_small.dcm",  # explicit VR LE, CT
    "693_UNCI.dcm",  # 512² CT, 14 of 16 bits, signed
    "693_J2KR.dcm",  # JPEG 2000 lossless CT
    "693_J2KI.dcm",  # JPEG 2000 CT
    "bad_sequence.dcm",  # 512² CT, JPEG Lossless SV1, 12 of 16 bits
    "JPEG-LL.dcm",  # JPEG Lossless SV1, signed 16 bit (NM)
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG Lossless SV1, 8 bit
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_implicit.dcm",  # implicit VR LE
    "MR_small_bigendian.dcm",  # explicit VR big endian (pydicom reads the header and the pixels)
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless, small
    "mlut_18.dcm",  # 12 of 16 bits signed, uncompressed: unused high bits
    "MR2_UNCI.dcm",  # non-integral RescaleSlope → float32
]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_files_decode_like_pydicom(tmp_path, name):
    sources = study_from_real(real_file(name), tmp_path / "s")
    expected = np.stack([reference_hu(ds) for ds in sources])
    for decoder in ("auto", "pydicom", "dicomsdl"):
        study = load_study(tmp_path / "s", decoder=decoder)
        integral = np.array_equal(expected, np.round(expected)) and np.abs(expected).max() < 32768
        assert study.volume.dtype == (np.int16 if integral else np.float32), decoder
        np.testing.assert_array_equal(study.volume, expected.astype(study.volume.dtype), err_msg=decoder)
        assert study.stored_reversed and list(study.instance_numbers) == [3, 2, 1]
        assert study.metadata["transfer_syntax"] == str(sources[0].file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("name", REAL_FILES)
def test_fast_header_reader_matches_pydicom(name):
    path = Path(real_file(name))
    with open(path, "rb") as fh:
        try:
            fast = headers_mod._header_fast(path, fh)
        except _fast_header.Unsupported:
            assert name == "MR_small_bigendian.dcm"
            return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = headers_mod._header_pydicom(path, pydicom.dcmread(path, defer_size=256))
    for key, value in vars(slow).items():
        if key != "ds":
            np.testing.assert_equal(getattr(fast, key), value, err_msg=key)


@pytest.mark.parametrize("shape", [(6, 5), (20, 20)])  # pixels kept in memory / left on disk by pydicom
def test_file_without_preamble_or_meta(tmp_path, shape):
    files, expected = write_series(tmp_path / "s", n=3, shape=shape)
    for f in files:  # rewrite as bare implicit VR datasets, as very old software did
        ds = pydicom.dcmread(f)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(f, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert f.read_bytes()[128:132] != b"DICM"
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, expected)
    assert study.metadata["transfer_syntax"] == ImplicitVRLittleEndian


def test_in_process_decoding_matches_workers(tmp_path):
    sources = study_from_real(real_file("bad_sequence.dcm"), tmp_path / "s", n=4)
    expected = np.stack([reference_hu(ds) for ds in sources])
    for workers in (0, 1, 2):
        np.testing.assert_array_equal(load_study(tmp_path / "s", workers=workers).volume, expected)


def test_rescale_per_slice_and_int16_overflow(tmp_path):
    folder = tmp_path / "s"
    series = generate_uid()
    big = np.full((4, 4), 65000, dtype=np.uint16)  # 65000 - 1024 does not fit int16
    write_slice(folder / "1.dcm", big, position=(0, 0, 2), instance=1, series_uid=series)
    write_slice(folder / "2.dcm", big // 2, position=(0, 0, 1), instance=2, series_uid=series, slope=2)
    study = load_study(folder)
    assert study.volume.dtype == np.float32
    assert study.volume[0, 0, 0] == 65000 - 1024 and study.volume[1, 0, 0] == 65000 - 1024
    write_slice(folder / "2.dcm", big // 2, position=(0, 0, 1), instance=2, series_uid=series, slope=0.5)
    np.testing.assert_allclose(load_study(folder).volume[1], 32500 * 0.5 - 1024)


def test_unused_high_bits_are_masked_like_pydicom(tmp_path):
    folder = tmp_path / "s"
    raw = np.array([[0x0FFF, 0x7FF, 0x800, 0xF001]], dtype=np.uint16).view(np.int16)  # 12 bits stored
    write_slice(folder / "1.dcm", raw, position=(0, 0, 0), instance=1, series_uid="1.2", bits_stored=12)
    expected = pydicom.dcmread(folder / "1.dcm").pixel_array - 1024.0
    np.testing.assert_array_equal(load_study(folder).volume[0], expected)
    assert load_study(folder).volume[0].tolist() == [[-1 - 1024, 2047 - 1024, -2048 - 1024, 1 - 1024]]


def test_implicit_vr_and_metadata(tmp_path):
    folder = tmp_path / "s"
    extra = {
        "PatientAge": "045Y",
        "PatientSex": "F",
        "KVP": 120,
        "XRayTubeCurrent": 250,
        "Exposure": 100,
        "Manufacturer": "ACME",
        "ConvolutionKernel": "BONE",
    }
    _, expected = write_series(folder, n=3, syntax=ImplicitVRLittleEndian, extra=extra)
    study = load_study(folder)
    np.testing.assert_array_equal(study.volume, expected)
    meta = study.metadata
    assert meta["patient_age_years"] == 45.0 and meta["patient_sex"] == "F"
    assert (meta["kvp"], meta["xray_tube_current"], meta["exposure"]) == (120.0, 250.0, 100.0)
    assert (meta["pixel_spacing_row"], meta["pixel_spacing_col"]) == (0.5, 0.6)
    assert (meta["rows"], meta["cols"], meta["num_slices"]) == (6, 5, 3)
    assert meta["manufacturer"] == "ACME" and meta["convolution_kernel"] == "BONE"
    assert meta["transfer_syntax"] == ImplicitVRLittleEndian and meta["dropped_files"] == []
    assert meta["slice_thickness"] == 1.0 and meta["series_uid"] == study.metadata["series_uid"]
    assert study.uid == "1.2.3.4" and load_study(folder, uid="abc").uid == "abc"
    assert study.spacing == pytest.approx((2.0, 0.5, 0.6))


def test_metadata_keys_present_when_absent(tmp_path):
    write_series(tmp_path / "s", n=2)
    meta = load_study(tmp_path / "s").metadata
    for key in ("kvp", "xray_tube_current", "exposure", "patient_sex", "patient_age_years", "manufacturer"):
        assert key in meta and meta[key] is None


# ------------------------------------------------------------------------------------------ ordering


def test_order_by_position_not_file_name(tmp_path):
    names = ["zz.dcm", "a.dcm", "10.dcm", "9.dcm", "b", "1.dcm"]
    files, expected = write_series(tmp_path / "s", names=names, first_instance=101)
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, expected)
    assert study.files == files
    assert list(study.instance_numbers) == list(range(101, 107))
    assert not study.stored_reversed and not study.metadata["stored_reversed"]
    assert np.all(np.diff(study.z_positions) < 0)
    assert study.positions.shape == (6, 3) and study.positions[0, 2] == 50.0


def test_reversed_storage_is_superior_first(tmp_path):
    _, expected = write_series(tmp_path / "s", reversed_storage=True, first_instance=5)
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, expected)
    assert study.stored_reversed and study.metadata["stored_reversed"]
    assert list(study.instance_numbers) == list(range(10, 4, -1))


@pytest.mark.parametrize(
    "orientation",
    [
        (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # normal −z: flipped to point superior
        (1.0, 0.0, 0.0, 0.0, np.cos(0.35), -np.sin(0.35)),  # oblique (tilted 20°)
    ],
)
def test_order_along_normal_for_other_orientations(tmp_path, orientation):
    _, expected = write_series(tmp_path / "s", orientation=orientation, dz=1.5)
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, expected)
    assert study.spacing[0] == pytest.approx(1.5)
    assert study.positions[0, 2] > study.positions[-1, 2]


# ---------------------------------------------------------------------------------------- bad inputs


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(StudyReadError, match="nope"):
        load_study(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudyReadError, match="empty"):
        load_study(tmp_path / "empty")


def test_non_ct_modality_names_file(tmp_path):
    files, _ = write_series(tmp_path / "s", n=3)
    series = pydicom.dcmread(files[0]).SeriesInstanceUID
    pixels = np.zeros((6, 5), np.int16)
    write_slice(
        tmp_path / "s" / "odd.dcm", pixels, position=(0, 0, -50), instance=9, series_uid=series, modality="MR"
    )
    with pytest.raises(StudyReadError, match=r"odd\.dcm.*'MR'"):
        load_study(tmp_path / "s")


def test_two_series_listed(tmp_path):
    write_series(tmp_path / "s", n=3, series_uid="1.2.840.1")
    write_series(tmp_path / "s", n=2, series_uid="1.2.840.2", names=["a.dcm", "b.dcm"])
    with pytest.raises(StudyReadError, match=r"2 series") as err:
        load_study(tmp_path / "s")
    assert "1.2.840.1: 3 files" in str(err.value) and "1.2.840.2: 2 files" in str(err.value)


def test_two_orientations_rejected(tmp_path):
    files, _ = write_series(tmp_path / "s", n=3)
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    ds.save_as(files[1])
    with pytest.raises(StudyReadError, match=r"ImageOrientationPatient.*2\.dcm"):
        load_study(tmp_path / "s")


def test_duplicate_positions_name_both_files(tmp_path):
    files, _ = write_series(tmp_path / "s", n=4)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(StudyReadError, match="same slice position") as err:
        load_study(tmp_path / "s")
    assert "2.dcm" in str(err.value) and "3.dcm" in str(err.value)


def test_gap_policy(tmp_path):
    files, expected = write_series(tmp_path / "s", n=8)
    files[3].unlink()  # one missing slice: tolerated with a warning
    with pytest.warns(UserWarning, match=r"3\.dcm and 5\.dcm"):
        study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, np.delete(expected, 3, axis=0))
    assert study.metadata["missing_slices"] == 1 and study.spacing[0] == pytest.approx(2.0)
    files[4].unlink()
    files[5].unlink()  # three in a row: more than max_missing_slices=2
    with pytest.raises(StudyReadError, match=r"3 slice\(s\).*3\.dcm and 7\.dcm"):
        load_study(tmp_path / "s")
    with pytest.warns(UserWarning):
        assert load_study(tmp_path / "s", max_missing_slices=3).shape[0] == 5


def test_zero_byte_and_truncated_slices(tmp_path):
    files, expected = write_series(tmp_path / "s", n=8)
    files[2].write_bytes(b"")
    data = files[5].read_bytes()
    files[5].write_bytes(data[: len(data) - 20])  # cut inside the pixel data
    with pytest.warns(UserWarning, match="3.dcm") as record:
        study = load_study(tmp_path / "s")
    assert any("6.dcm" in str(w.message) for w in record)
    np.testing.assert_array_equal(study.volume, np.delete(expected, [2, 5], axis=0))
    assert sorted(study.metadata["dropped_files"]) == ["3.dcm", "6.dcm"]
    assert len(study.files) == 6 and files[2] not in study.files
    with pytest.raises(StudyReadError, match=r"3\.dcm.*6\.dcm") as err:
        load_study(tmp_path / "s", max_missing_slices=1)
    assert "1× empty file (e.g. 3.dcm)" in str(err.value)  # why each was dropped, not only which
    assert "(e.g. 6.dcm)" in str(err.value)
    files[0].write_bytes(data[:300])  # cut inside the header
    with pytest.raises(StudyReadError, match=r"1\.dcm"):
        load_study(tmp_path / "s")


def test_stray_files_ignored_with_warning(tmp_path):
    _, expected = write_series(tmp_path / "s", n=3)
    (tmp_path / "s" / "notes.txt").write_text("scanned on tuesday\n")
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(200))
    (tmp_path / "s" / "empty.txt").write_bytes(b"")
    shutil.copy(real_file("DICOMDIR"), tmp_path / "s" / "DICOMDIR")
    with pytest.warns(UserWarning, match=r"\.DS_Store, DICOMDIR, empty\.txt, notes\.txt"):
        study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, expected)
    assert sorted(study.metadata["ignored_files"]) == [".DS_Store", "DICOMDIR", "empty.txt", "notes.txt"]
    assert study.metadata["dropped_files"] == []


def test_only_unreadable_files(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "1.dcm").write_bytes(b"")
    with pytest.raises(StudyReadError, match=r"no readable DICOM slice.*1\.dcm"):
        load_study(tmp_path / "s")


def test_bad_decoder_name(tmp_path):
    with pytest.raises(ValueError, match="decoder"):
        load_study(tmp_path, decoder="gdcm")


# ---------------------------------------------------------------------------------- worker isolation


def _worker_died() -> bool:
    pool = decode_pool._POOL
    return pool is not None and any(not w.alive() for w in pool.workers)


@pytest.mark.parametrize("victim", ["x2_1.dcm", "*"])
def test_worker_crash_falls_back_to_pydicom(tmp_path, monkeypatch, victim):
    sources = study_from_real(real_file("bad_sequence.dcm"), tmp_path / "s", n=5)
    expected = np.stack([reference_hu(ds) for ds in sources])
    monkeypatch.setenv(decode_pool.CRASH_TEST_ENV, victim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is silent and complete: nothing dropped
        study = load_study(tmp_path / "s", decoder="dicomsdl")
    assert _worker_died(), "the crash hook did not kill a worker"
    np.testing.assert_array_equal(study.volume, expected)
    assert study.metadata["dropped_files"] == []
    monkeypatch.delenv(decode_pool.CRASH_TEST_ENV)
    np.testing.assert_array_equal(load_study(tmp_path / "s", decoder="dicomsdl").volume, expected)
    assert not _worker_died()


def test_decoder_worker_imports_nothing_of_cervspine(tmp_path):
    # the worker is started from its file path, as Worker does: it must not need (or import) the package
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='worker'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cervspine'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, decode_pool.WORKER_SCRIPT], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_dicomsdl_failure_retried_with_pydicom(tmp_path):
    # explicit_VR-UN.dcm: dicomsdl raises on its UN-encoded values, pydicom decodes it
    src = real_file("explicit_VR-UN.dcm")
    folder = tmp_path / "s"
    folder.mkdir()
    shutil.copy(src, folder / "only.dcm")
    expected = reference_hu(pydicom.dcmread(src))
    np.testing.assert_array_equal(load_study(folder, decoder="dicomsdl").volume[0], expected)


def test_shutdown_and_restart_pool(tmp_path):
    sources = study_from_real(real_file("MR_small_RLE.dcm"), tmp_path / "s", n=2)
    shutdown_decoders()
    assert decode_pool._POOL is None
    study = load_study(tmp_path / "s")
    np.testing.assert_array_equal(study.volume, np.stack([reference_hu(ds) for ds in sources]))
    assert isinstance(study, Study)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_pool(tmp_path):
    sources = study_from_real(real_file("bad_sequence.dcm"), tmp_path / "s", n=2)
    expected = np.stack([reference_hu(ds) for ds in sources])
    load_study(tmp_path / "s")  # the parent's pool is up
    parent_workers = list(decode_pool._POOL.workers)
    pid = os.fork()
    if pid == 0:  # child: must not talk to the parent's workers
        code = 1
        try:
            ok = decode_pool._POOL is None and np.array_equal(load_study(tmp_path / "s").volume, expected)
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert all(w.alive() for w in parent_workers) and decode_pool._POOL.workers == parent_workers
    np.testing.assert_array_equal(load_study(tmp_path / "s").volume, expected)
