"""Fuzzing the DICOM reader (issue 8) and the regressions it found.

Property: on mutated slice files, ``load_study`` returns a consistent :class:`Study` or raises
:class:`CervspineInputError` — never another exception, never a hang. Mutations are byte-level (bit flips,
overwrites, truncation, insertions, deletions, extreme 2/4-byte values, mostly in the header) and
value-level (hostile values for the header fields the reader uses), on small synthetic series in every
transfer syntax the generator writes and on real pydicom test files. ``make test`` runs a quick
derandomized round; ``make fuzz`` (or ``make test-slow``) fuzzes for ``CERVSPINE_FUZZ_SECONDS``.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from cervspine.io import CervspineInputError, Study, StudyReadError, load_study
from cervspine.synthetic import PhantomParams, make_phantom, write_study_dicom
from tests.helpers import AXIAL, write_series

HEADER_BYTES = 1024  # most mutations land here: the pixel data of small files follows soon after
FUZZ_SECONDS = float(os.environ.get("CERVSPINE_FUZZ_SECONDS", "60"))
QUICK = settings(
    max_examples=40, derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
TAGS = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient",
    "InstanceNumber", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "Modality",
    "SeriesInstanceUID", "StudyInstanceUID", "PatientAge", "PatientSex", "KVP", "PhotometricInterpretation",
    "SpecificCharacterSet", "PixelData",
)  # fmt: skip
VALUES = (
    None, "", "nan", "inf", "-inf", "1e308", "-1", "0", "65535", "4294967295", "99999999999999999999", "abc",
    "1\\2", "1\\0\\0\\0\\1\\0", "0\\0\\0\\0\\0\\0", "1.5", b"\x00\xff", "MR", "YBR_FULL", "RGB",
    "ISO_IR 192", "GB18030", "\u00e9\u00e8", "045Y", "xxxW", 1, 3, 8, 12, 32, 64,
)  # fmt: skip


# --------------------------------------------------------------------------------------------- seeds


def _real_as_ct(name: str, folder: Path) -> None:
    """A pydicom test file turned into a one-slice CT series (pixel data untouched)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name, download=False))
    ds.Modality = "CT"
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = list(AXIAL)
    folder.mkdir(parents=True)
    ds.save_as(folder / "1.dcm")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Small valid series: name → {file name: bytes}."""
    base = tmp_path_factory.mktemp("seeds")
    phantom = make_phantom(0, PhantomParams(size=32, n_slices=3, slice_spacing=1.0))
    for syntax in ("explicit", "implicit", "jpeg_lossless", "rle", "jpeg2000"):
        write_study_dicom(phantom, base / syntax, transfer_syntax=syntax)
    write_study_dicom(make_phantom(1, PhantomParams(size=32, n_slices=1)), base / "single")
    write_study_dicom(phantom, base / "unsigned12", signed=False, bits_stored=12)
    for name in ("CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"):
        _real_as_ct(name, base / name)
    out = {d.name: {f.name: f.read_bytes() for f in sorted(d.iterdir())} for d in sorted(base.iterdir())}
    for name, files in out.items():  # every seed is valid to begin with
        assert _outcome(_write(files, Path(tempfile.mkdtemp(dir=base))), workers=0) == "study", name
    return out


def _write(files: dict[str, bytes], folder: Path) -> Path:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _outcome(folder: Path, workers: int) -> str:
    """ "study" (consistent) or "error" (CervspineInputError); anything else fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = load_study(folder, workers=workers)
    except CervspineInputError:
        return "error"
    assert isinstance(study, Study)
    z = study.volume.shape[0]
    assert study.volume.ndim == 3 and z >= 1
    assert (
        len(study.instance_numbers) == len(study.z_positions) == len(study.files) == len(study.positions) == z
    )
    assert np.all(np.diff(study.z_positions) < 0), "slices not strictly superior → inferior"
    assert all(np.isfinite(v) and v > 0 for v in study.spacing), f"spacing {study.spacing}"
    assert study.volume.dtype == np.int16 or np.isfinite(study.volume).all(), "non-finite HU"
    return "study"


# ------------------------------------------------------------------------------------------ mutations


def _mutate_bytes(data: st.DataObject, files: dict[str, bytes]) -> dict[str, bytes]:
    files = dict(files)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        name = data.draw(st.sampled_from(sorted(files)), label="file")
        raw = bytearray(files[name])
        if not raw:
            continue
        head = min(len(raw), HEADER_BYTES)
        pos = data.draw(st.integers(0, head - 1) | st.integers(0, len(raw) - 1), label="position")
        op = data.draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete", "field"]))
        if op == "flip":
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "overwrite":
            raw[pos : pos + 8] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 16))]
        else:
            value = data.draw(
                st.sampled_from([b"\xff\xff", b"\0\0", b"\xff\xff\xff\xff", b"\0\0\0\0", b"\xff\x7f"])
            )
            raw[pos : pos + len(value)] = value
        files[name] = bytes(raw)
    return files


def _mutate_values(data: st.DataObject, folder: Path) -> None:
    """Hostile values for header fields, in one file or in all (pydicom writes them as it can)."""
    paths = sorted(folder.iterdir())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        tag, value = data.draw(st.sampled_from(TAGS)), data.draw(st.sampled_from(VALUES))
        targets = (
            paths if data.draw(st.booleans(), label="all files") else [data.draw(st.sampled_from(paths))]
        )
        for path in targets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
                try:
                    if value is None:
                        ds.pop(tag, None)
                    elif tag == "PixelData":
                        ds.PixelData = (
                            value if isinstance(value, bytes) else ds.PixelData[: len(ds.PixelData) // 2]
                        )
                    elif tag in ds:
                        ds[tag].value = value
                    else:
                        setattr(ds, tag, value)
                    ds.save_as(path)
                except Exception:  # noqa: BLE001 - pydicom refused to write that value: keep the file as is
                    continue


def _check_one(seeds: dict[str, dict[str, bytes]], data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    workers = data.draw(st.sampled_from([0, 2]), label="workers")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if data.draw(st.booleans(), label="value-level"):
            _mutate_values(data, _write(seeds[seed], folder))
        else:
            _write(_mutate_bytes(data, seeds[seed]), folder)
        _outcome(folder, workers)


@pytest.mark.timeout(600)
def test_load_study_on_mutated_files_quick(seeds):
    QUICK(given(data=st.data())(lambda data: _check_one(seeds, data)))()


@pytest.mark.slow
@pytest.mark.timeout(int(FUZZ_SECONDS) + 900)
def test_load_study_on_mutated_files_for_a_time_budget(seeds):
    """Rounds of 100 random examples until CERVSPINE_FUZZ_SECONDS; failures are saved in .hypothesis/."""
    long = settings(
        QUICK, max_examples=100, derandomize=False, database=settings.default.database
    )  # fmt: skip
    deadline, rounds = time.monotonic() + FUZZ_SECONDS, 0
    while time.monotonic() < deadline:
        long(given(data=st.data())(lambda data: _check_one(seeds, data)))()
        rounds += 1
    print(f"fuzzed load_study: {rounds} rounds of 100 examples in {FUZZ_SECONDS:.0f} s")


# -------------------------------------------------------------------------- regressions found by fuzzing


def _set_vr(path: Path, tag: bytes, old: bytes, new: bytes) -> None:
    """Change one element's VR in an explicit VR little endian file (a corruption pydicom rejects)."""
    raw = path.read_bytes()
    assert raw.count(tag + old) == 1
    path.write_bytes(raw.replace(tag + old, tag + new))


SLICE_THICKNESS, CHARSET = b"\x18\x00\x50\x00", b"\x08\x00\x05\x00"


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_rle_frame_is_a_dropped_slice_not_a_panic(tmp_path, workers):
    # pylibjpeg-rle panics (pyo3 PanicException, a BaseException) on a run past the end of its segment
    files = write_study_dicom(
        make_phantom(0, PhantomParams(size=32, n_slices=4)), tmp_path, transfer_syntax="rle"
    )
    ds = pydicom.dcmread(files[1])
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[64] = 0x81  # first segment: "repeat the next byte 128 times" at its very start
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(files[1])
    with pytest.warns(UserWarning, match=files[1].name):
        study = load_study(tmp_path, workers=workers)
    assert study.shape[0] == 3 and study.metadata["dropped_files"] == [files[1].name]


def test_first_slice_header_pydicom_cannot_parse_is_a_clear_error(tmp_path):
    files, _ = write_series(tmp_path, n=3, extra={"SpecificCharacterSet": "ISO_IR 100"})
    _set_vr(files[0], CHARSET, b"CS", b"BS")  # the fast reader skips it; pydicom raises NotImplementedError
    with pytest.raises(StudyReadError, match=r"1\.dcm: cannot read the DICOM header"):
        load_study(tmp_path)


def test_first_slice_value_pydicom_cannot_convert_is_a_clear_error(tmp_path):
    files, _ = write_series(tmp_path, n=3)
    _set_vr(files[0], SLICE_THICKNESS, b"DS", b"DR")
    with pytest.raises(StudyReadError, match=r"1\.dcm: cannot read the DICOM metadata"):
        load_study(tmp_path)


def test_single_slice_thickness_pydicom_cannot_convert_is_a_clear_error(tmp_path):
    files, _ = write_series(tmp_path, n=1)
    _set_vr(files[0], SLICE_THICKNESS, b"DS", b"DR")
    with pytest.raises(StudyReadError, match=r"1\.dcm: cannot read the slice spacing"):
        load_study(tmp_path)


@pytest.mark.parametrize("field", ["RescaleSlope", "RescaleIntercept"])
def test_non_finite_rescale_is_a_clear_error(tmp_path, field):
    # before: a NaN slope gave an all-NaN float32 volume without a word
    files, _ = write_series(tmp_path, n=3)
    ds = pydicom.dcmread(files[2])
    setattr(ds, field, "nan")
    ds.save_as(files[2])
    with pytest.raises(StudyReadError, match=r"non-finite RescaleSlope/RescaleIntercept in 3\.dcm"):
        load_study(tmp_path)


def test_rescale_overflowing_float32_drops_the_slice(tmp_path):
    # before: RescaleSlope 1e308 with a fractional intercept gave a float32 volume of inf
    files, _ = write_series(tmp_path, n=4)
    ds = pydicom.dcmread(files[1])
    ds.RescaleSlope, ds.RescaleIntercept = "1e308", "1.5"
    ds.save_as(files[1])
    with pytest.warns(UserWarning, match=r"unreadable slice file\(s\): 2\.dcm"):
        study = load_study(tmp_path)
    assert study.shape[0] == 3 and np.isfinite(study.volume).all()


@pytest.mark.parametrize("spacing", [["nan", "0.5"], ["-1", "0.5"], ["0", "0"]])
def test_invalid_pixel_spacing_is_taken_as_1_mm(tmp_path, spacing):
    files, _ = write_series(tmp_path, n=3)
    ds = pydicom.dcmread(files[0])
    ds.PixelSpacing = spacing
    ds.save_as(files[0])
    with pytest.warns(UserWarning, match="no valid PixelSpacing"):
        assert load_study(tmp_path).spacing[1:] == (1.0, 1.0)


def test_single_slice_with_nan_thickness_gets_a_finite_spacing(tmp_path):
    files, _ = write_series(tmp_path, n=1)
    ds = pydicom.dcmread(files[0])
    ds.SliceThickness = "nan"
    ds.SpacingBetweenSlices = "-2"
    ds.save_as(files[0])
    assert load_study(tmp_path).spacing[0] == 1.0


def test_instance_number_beyond_32_bits_is_ignored(tmp_path):
    # before: OverflowError building the int64 instance numbers
    files, _ = write_series(tmp_path, n=3)
    ds = pydicom.dcmread(files[1])
    ds.InstanceNumber = "99999999999999999999"
    ds.save_as(files[1])
    assert load_study(tmp_path).instance_numbers.tolist() == [1, 2, 3]  # from the file name instead


def test_positions_too_large_to_project_are_a_clear_error(tmp_path):
    row, col = (0.7071068, 0.7071068, 0.0), (0.0, 0.0, 1.0)  # slice normal (0.71, -0.71, 0)
    files, _ = write_series(tmp_path, n=3, orientation=(*row, *col))
    ds = pydicom.dcmread(files[1])
    ds.ImagePositionPatient = ["1.7e308", "-1.7e308", "0"]
    ds.save_as(files[1])
    with pytest.raises(StudyReadError, match=r"ImagePositionPatient out of range in 2\.dcm"):
        load_study(tmp_path)
