"""RSNA CSV readers, validators and the folder index, on tiny hand-written folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cervspine import TARGETS
from cervspine.io.atomic import write_csv_atomic
from cervspine.io.errors import CervspineInputError, CsvValidationError
from cervspine.io.rsna import (
    KNOWN_BAD_STUDIES,
    RsnaIndex,
    read_boxes,
    read_sample_submission,
    read_test,
    read_train_labels,
    trained_on_synthetic_data,
    validate_box_slices,
    validate_boxes,
)

HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"
BOX_HEADER = "StudyInstanceUID,x,y,width,height,slice_number\n"
# "1.20" would become the float 1.2 if UIDs were parsed as numbers
TRAIN = HEADER + "1.20,1,0,1,0,0,0,0,0\n1.2.3,0,0,0,0,0,0,0,0\n1.2.4,1,1,0,0,0,0,0,1\n"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _study(root: Path, split: str, uid: str, numbers: tuple[int, ...] = (1, 2, 3)) -> None:
    for n in numbers:
        _write(root / split / uid / f"{n}.dcm", "")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Three labelled studies (one boxed, two segmented) and one test study."""
    _write(tmp_path / "train.csv", TRAIN)
    _write(tmp_path / "train_bounding_boxes.csv", BOX_HEADER + "1.20,10,20,30.5,40,2\n1.20,11,21,30,40,3\n")
    _write(
        tmp_path / "test.csv",
        "row_id,StudyInstanceUID,prediction_type\n" + "".join(f"9.9_{t},9.9,{t}\n" for t in TARGETS),
    )
    for uid in ("1.20", "1.2.3", "1.2.4"):
        _study(tmp_path, "train_images", uid)
    _study(tmp_path, "test_images", "9.9")
    _write(tmp_path / "segmentations" / "1.20.nii", "")
    _write(tmp_path / "segmentations" / "1.2.4.nii.gz", "")
    return tmp_path


def _error(func, *args, **kwargs) -> str:
    with pytest.raises(CsvValidationError) as info:
        func(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------- train.csv
def test_read_train_labels(tmp_path: Path) -> None:
    labels = read_train_labels(_write(tmp_path / "train.csv", TRAIN))
    assert labels.index.tolist() == ["1.20", "1.2.3", "1.2.4"]
    assert labels.index.name == "StudyInstanceUID"
    assert list(labels.columns) == list(TARGETS)
    assert (labels.dtypes == np.int64).all()
    assert labels.loc["1.2.4"].tolist() == [1, 0, 0, 0, 0, 0, 1, 1]


def test_train_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", "StudyInstanceUID,patient_overall,C1\n1.2,0,0\n")
    message = _error(read_train_labels, path)
    assert "train.csv" in message and "missing column(s) C2" in message


@pytest.mark.parametrize("bad", ["2", "", "x", "0.5", "nan"])
def test_train_bad_label(tmp_path: Path, bad: str) -> None:
    path = _write(tmp_path / "train.csv", HEADER + "1.1,0,0,0,0,0,0,0,0\n" + f"1.2,0,0,0,{bad},0,0,0,0\n")
    message = _error(read_train_labels, path)
    assert "column C3" in message and "line 3" in message and "train.csv" in message


def test_train_duplicates_inconsistency_and_all_problems_at_once(tmp_path: Path) -> None:
    rows = "1.1,0,0,0,0,0,0,0,0\n1.2,0,1,0,0,0,0,0,0\n1.1,0,0,0,0,0,0,0,0\n1.3,1,0,0,0,0,0,0,0\n"
    message = _error(read_train_labels, _write(tmp_path / "train.csv", HEADER + rows))
    assert "2 problems" in message
    assert "duplicated StudyInstanceUID ('1.1') at lines 2, 4" in message
    assert "patient_overall differs from max(C1..C7) at lines 3, 5" in message


def test_empty_csv(tmp_path: Path) -> None:
    assert "empty" in _error(read_train_labels, _write(tmp_path / "train.csv", ""))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_train_labels(tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------------------ boxes
def test_read_boxes(tmp_path: Path) -> None:
    boxes = read_boxes(_write(tmp_path / "b.csv", BOX_HEADER + "1.20,1,2,3,4,5\n"))
    assert boxes["StudyInstanceUID"].tolist() == ["1.20"]
    assert boxes["slice_number"].dtype == np.int64 and boxes["x"].dtype == np.float64


def test_boxes_bad_rows(tmp_path: Path) -> None:
    rows = "1.1,0,0,0,4,5\n1.1,-1,0,3,4,5\n1.1,0,0,3,4,5.5\n1.1,a,0,3,4,5\n"
    message = _error(read_boxes, _write(tmp_path / "b.csv", BOX_HEADER + rows))
    assert "column x: not a number ('a') at line 5" in message
    assert "slice_number: not an integer at line 4" in message
    rows = "1.1,0,0,0,4,5\n1.1,-1,0,3,4,5\n1.1,500,0,30,4,5\n"
    path = _write(tmp_path / "b.csv", BOX_HEADER + rows)
    message = _error(read_boxes, path, image_shape=(512, 512))
    assert "non-positive width or height at line 2" in message
    assert "negative x or y at line 3" in message
    assert "outside the 512x512 image at line 4" in message


def test_validate_boxes_and_slices(tmp_path: Path) -> None:
    boxes = read_boxes(_write(tmp_path / "b.csv", BOX_HEADER + "1.1,0,0,10,10,1\n1.2,100,0,30,10,7\n"))
    validate_boxes(boxes, {"1.1": (3, 16, 16)})  # 1.2 not given: only sign/size checks
    message = _error(validate_boxes, boxes, {"1.1": (16, 16), "1.2": (3, 120, 120)})
    assert "outside its study's image at line 3" in message and "train_bounding_boxes.csv" in message
    validate_box_slices(boxes, {"1.1": [1, 2], "1.2": range(5, 9)})
    message = _error(validate_box_slices, boxes, {"1.2": [1, 2, 3]}, source="my.csv")
    assert message.startswith("my.csv") and "line 3" in message


# ----------------------------------------------------------------------------------- test / submission
def test_read_test_and_errors(tmp_path: Path) -> None:
    header = "row_id,StudyInstanceUID,prediction_type\n"
    test = read_test(
        _write(tmp_path / "test.csv", header + "1.5_C1,1.5,C1\n1.5_patient_overall,1.5,patient_overall\n")
    )
    assert test["StudyInstanceUID"].tolist() == ["1.5", "1.5"]
    rows = "1.5_C1,1.5,C1\n1.5_C2,1.5,C3\n1.5_C8,1.5,C8\n1.5_C1,1.5,C1\n"
    message = _error(read_test, _write(tmp_path / "test.csv", header + rows))
    assert "prediction_type not one of" in message and "('C8') at line 4" in message
    assert "row_id is not <StudyInstanceUID>_<prediction_type> at line 3" in message
    assert "duplicated row_id at lines 2, 5" in message


def test_read_sample_submission(tmp_path: Path) -> None:
    header = "row_id,fractured\n"
    sub = read_sample_submission(_write(tmp_path / "s.csv", header + "1.5_C1,0.5\n1.5_patient_overall,0\n"))
    assert sub["fractured"].tolist() == [0.5, 0.0]
    message = _error(read_sample_submission, _write(tmp_path / "s.csv", header + "1.5_C1,1.5\n1.5_X,0.5\n"))
    assert "outside [0, 1] at line 2" in message and "_<target>" in message and "line 3" in message


# ------------------------------------------------------------------------------------------------ index
def test_index_from_root(root: Path) -> None:
    index = RsnaIndex.from_root(root)
    assert index.train_uids == ["1.20", "1.2.3", "1.2.4"]
    assert index.test_uids == ["9.9"]
    assert index.uids_with_boxes == ["1.20"]
    assert index.uids_with_segmentation == ["1.20", "1.2.4"]
    assert index.segmentation_path("1.2.4") == root / "segmentations" / "1.2.4.nii.gz"
    assert index.segmentation_path("1.2.3") is None
    assert index.study_dir("1.20") == root / "train_images" / "1.20"
    assert index.study_dir("9.9") == root / "test_images" / "9.9"
    with pytest.raises(KeyError):
        index.study_dir("0.0")
    assert index.slice_numbers("1.20") == [1, 2, 3]
    index.check_box_slices()
    summary = index.summary()
    assert summary["n_train"] == 3 and summary["n_positive_patient_overall"] == 2
    assert summary["n_with_boxes"] == 1 and summary["n_boxed_slices"] == 2
    assert summary["n_with_segmentation"] == 2 and summary["n_with_boxes_and_segmentation"] == 1
    assert summary["n_test"] == 1 and summary["n_test_rows"] == 8


def test_index_exclusions(root: Path) -> None:
    assert KNOWN_BAD_STUDIES == ("1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952")
    index = RsnaIndex.from_root(root, exclude=["1.20", "not.present"])
    assert index.train_uids == ["1.2.3", "1.2.4"]
    assert index.excluded == ("1.20",)
    assert index.boxes.empty and index.uids_with_segmentation == ["1.2.4"]


def test_box_slice_not_a_file(root: Path) -> None:
    _write(root / "train_bounding_boxes.csv", BOX_HEADER + "1.20,10,20,30,40,2\n1.20,10,20,30,40,99\n")
    message = _error(RsnaIndex.from_root(root).check_box_slices)
    assert "slice_number is not a file of the study at line 3" in message


def test_missing_train_folder(root: Path) -> None:
    (root / "train_images" / "1.2.3" / "1.dcm").unlink()
    for n in (2, 3):
        (root / "train_images" / "1.2.3" / f"{n}.dcm").unlink()
    (root / "train_images" / "1.2.3").rmdir()
    message = _error(RsnaIndex.from_root, root)
    assert "1 of 3 studies have no folder" in message and "1.2.3" in message and "train_images" in message
    assert RsnaIndex.from_root(root, require_images=False).train_uids == ["1.20", "1.2.3", "1.2.4"]
    assert RsnaIndex.from_root(root, exclude=["1.2.3"]).train_uids == ["1.20", "1.2.4"]


def test_missing_test_folder(root: Path) -> None:
    _write(root / "test.csv", "row_id,StudyInstanceUID,prediction_type\n8.8_C1,8.8,C1\n")
    message = _error(RsnaIndex.from_root, root)
    assert "test.csv" in message and "8.8" in message


def test_unlisted_folder_warns(root: Path) -> None:
    _study(root, "train_images", "7.7")
    with pytest.warns(UserWarning, match="not in train.csv.*7.7"):
        index = RsnaIndex.from_root(root)
    assert "7.7" not in index.train_uids


def test_boxes_for_unknown_study(root: Path) -> None:
    _write(root / "train_bounding_boxes.csv", BOX_HEADER + "1.20,1,1,3,3,1\n5.5,1,1,3,3,1\n")
    message = _error(RsnaIndex.from_root, root)
    assert "boxes for studies not in train.csv: 5.5 at line 3" in message


def test_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        RsnaIndex.from_root(tmp_path / "nowhere")
    with pytest.raises(CervspineInputError, match=f"{tmp_path}.*empty"):
        RsnaIndex.from_root(tmp_path)


def test_test_only_root(tmp_path: Path) -> None:
    _write(tmp_path / "test.csv", "row_id,StudyInstanceUID,prediction_type\n9.9_C1,9.9,C1\n")
    _study(tmp_path, "test_images", "9.9")
    index = RsnaIndex.from_root(tmp_path)
    assert index.train_uids == [] and index.test_uids == ["9.9"] and index.summary()["n_train"] == 0


# ------------------------------------------------------------------------------------------------ write
def test_write_csv_atomic(tmp_path: Path) -> None:
    df = pd.DataFrame({"row_id": ["1.20_C1"], "fractured": [0.25]})
    path = write_csv_atomic(df, tmp_path / "out" / "submission.csv")
    back = pd.read_csv(path, dtype={"row_id": str})
    assert back["row_id"].tolist() == ["1.20_C1"] and back["fractured"].tolist() == [0.25]

    class Broken(pd.DataFrame):
        def to_csv(self, *args, **kwargs):  # type: ignore[override]
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_csv_atomic(Broken(df), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["submission.csv"]  # old file kept, no temp
    assert pd.read_csv(path)["fractured"].tolist() == [0.25]


def test_trained_on_synthetic_data_prefers_the_recorded_flag(tmp_path: Path) -> None:
    generated = tmp_path / "generated"
    generated.mkdir()
    (generated / "synthetic_manifest.csv").write_text("StudyInstanceUID\n")
    assert trained_on_synthetic_data({"root": str(generated)})  # older checkpoints: the folder tells
    assert not trained_on_synthetic_data({"root": str(tmp_path / "gone")})
    assert not trained_on_synthetic_data({})
    assert trained_on_synthetic_data({"root": str(tmp_path / "gone"), "synthetic": True})  # flag outlives it
    assert not trained_on_synthetic_data({"root": str(generated), "synthetic": False})
