"""The RSNA 2022 folder: CSV readers, validators and the study index.

Every reader keeps StudyInstanceUIDs as strings and raises :class:`CsvValidationError` naming the file,
the CSV line numbers (header = line 1) and each problem found, all problems of a file in one message.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cervspine import TARGETS, VERTEBRAE
from cervspine.io.errors import CervspineInputError, CsvValidationError

KNOWN_BAD_STUDIES: tuple[str, ...] = ("1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952")
"""Studies reported broken in the competition; exclude them through configuration."""

TRAIN_CSV = "train.csv"
BOXES_CSV = "train_bounding_boxes.csv"
TEST_CSV = "test.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
TRAIN_IMAGES = "train_images"
TEST_IMAGES = "test_images"
SEGMENTATIONS = "segmentations"

UID = "StudyInstanceUID"
LABEL_COLUMNS: tuple[str, ...] = ("patient_overall", *VERTEBRAE)
BOX_COLUMNS: tuple[str, ...] = (UID, "x", "y", "width", "height", "slice_number")
TEST_COLUMNS: tuple[str, ...] = ("row_id", UID, "prediction_type")
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id", "fractured")

_MAX_LISTED = 10


# ----------------------------------------------------------------------------------------------- helpers
def _listing(items: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    """Comma-separated first ``limit`` items, with a count of the rest."""
    shown = ", ".join(str(i) for i in items[:limit])
    extra = len(items) - limit
    return shown + (f" (+{extra} more)" if extra > 0 else "")


def _row_positions(df: pd.DataFrame, mask: np.ndarray) -> list[int]:
    """0-based data-row numbers of ``mask``: the integer index (file rows) when there is one."""
    rows = df.index[mask] if pd.api.types.is_integer_dtype(df.index) else np.flatnonzero(mask)
    return [int(r) for r in rows]


def _lines(rows: Sequence[int]) -> str:
    """Data-row numbers as CSV line numbers (header = line 1)."""
    word = "line" if len(rows) == 1 else "lines"
    return f"{word} {_listing([r + 2 for r in rows])}"


class _Problems:
    """Collects the problems of one file and raises them together."""

    def __init__(self, source: str | os.PathLike[str]) -> None:
        self.source = str(source)
        self.items: list[str] = []

    def add(self, what: str, df: pd.DataFrame | None = None, mask: Any = None) -> None:
        if df is None:
            self.items.append(what)
            return
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            self.items.append(f"{what} at {_lines(_row_positions(df, mask))}")

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise CsvValidationError(f"{self.source}: {self.items[0]}")
        if self.items:
            body = "\n  - ".join(self.items)
            raise CsvValidationError(f"{self.source}: {len(self.items)} problems:\n  - {body}")


def _examples(values: pd.Series, n: int = 3) -> str:
    return ", ".join(repr(v) for v in list(dict.fromkeys(values.tolist()))[:n])


def _read_raw(path: str | os.PathLike[str], required: Sequence[str]) -> pd.DataFrame:
    """Read a CSV as stripped strings (no NaN conversion) and check its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CsvValidationError(f"{path}: file is empty (expected columns {', '.join(required)})") from None
    except pd.errors.ParserError as err:
        raise CsvValidationError(f"{path}: cannot parse CSV: {err}") from err
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CsvValidationError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(df.columns) or 'none'}"
        )
    for col in df.columns:
        df[col] = df[col].astype(str).str.strip()
    return df


def _check_uids(df: pd.DataFrame, problems: _Problems) -> None:
    problems.add(f"empty {UID}", df, df[UID].eq(""))


def _check_numeric(df: pd.DataFrame, cols: Sequence[str], problems: _Problems) -> pd.DataFrame:
    """Columns ``cols`` as float64; non-numbers become NaN and are reported."""
    out = df[list(cols)].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    for col in cols:
        bad = ~np.isfinite(out[col].to_numpy())
        if bad.any():
            problems.add(f"column {col}: not a number ({_examples(df.loc[bad, col])})", df, bad)
    return out


# ----------------------------------------------------------------------------------------------- readers
def read_train_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``train.csv``: int64 labels indexed by StudyInstanceUID, columns C1…C7, patient_overall.

    Checks: required columns, non-empty unique UIDs, labels in {0, 1} (NaN, blanks and strings are
    errors), and patient_overall == max(C1…C7).
    """
    df = _read_raw(path, (UID, *LABEL_COLUMNS))
    problems = _Problems(path)
    _check_uids(df, problems)
    dup = df[UID].duplicated(keep=False) & df[UID].ne("")
    if dup.any():
        problems.add(f"duplicated {UID} ({_examples(df.loc[dup, UID])})", df, dup)
    values = df[list(LABEL_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    valid = values.isin([0, 1])
    for col in LABEL_COLUMNS:
        bad = ~valid[col].to_numpy()
        if bad.any():
            problems.add(f"column {col}: label not 0 or 1 ({_examples(df.loc[bad, col])})", df, bad)
    rows_ok = valid.all(axis=1).to_numpy()
    inconsistent = rows_ok & (values["patient_overall"] != values[list(VERTEBRAE)].max(axis=1)).to_numpy()
    problems.add("patient_overall differs from max(C1..C7)", df, inconsistent)
    problems.raise_if_any()
    labels = values[list(TARGETS)].astype(np.int64)
    labels.index = pd.Index(df[UID].astype(str).to_numpy(dtype=object), name=UID)
    return labels


def read_boxes(path: str | os.PathLike[str], image_shape: tuple[int, ...] | None = None) -> pd.DataFrame:
    """Read ``train_bounding_boxes.csv``: UID (str), x, y, width, height (float64), slice_number (int64).

    Checks: required columns, numbers, integral slice numbers, positive size, non-negative coordinates
    and, when ``image_shape`` (…, H, W) is given, boxes inside the image. The frame keeps the file's
    row numbers as its index, so later checks (:func:`validate_boxes`) report file lines.
    """
    df = _read_raw(path, BOX_COLUMNS)
    problems = _Problems(path)
    _check_uids(df, problems)
    nums = _check_numeric(df, BOX_COLUMNS[1:], problems)
    slices = nums["slice_number"].to_numpy()
    frac = np.isfinite(slices) & (slices != np.round(slices))
    problems.add("column slice_number: not an integer", df, frac)
    problems.raise_if_any()
    boxes = pd.DataFrame({UID: df[UID].to_numpy(dtype=object)}, index=df.index)
    for col in ("x", "y", "width", "height"):
        boxes[col] = nums[col]
    boxes["slice_number"] = nums["slice_number"].astype(np.int64)
    _check_box_geometry(boxes, problems, image_shape)
    problems.raise_if_any()
    return boxes


def read_test(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``test.csv`` (row_id, StudyInstanceUID, prediction_type; all str).

    Checks: required columns, prediction_type in TARGETS, row_id == ``<uid>_<prediction_type>``, unique
    row ids.
    """
    df = _read_raw(path, TEST_COLUMNS)
    problems = _Problems(path)
    _check_uids(df, problems)
    bad_type = ~df["prediction_type"].isin(TARGETS)
    if bad_type.any():
        got = _examples(df.loc[bad_type, "prediction_type"])
        problems.add(f"prediction_type not one of {', '.join(TARGETS)} ({got})", df, bad_type)
    expected = df[UID] + "_" + df["prediction_type"]
    problems.add("row_id is not <StudyInstanceUID>_<prediction_type>", df, df["row_id"].ne(expected))
    dup = df["row_id"].duplicated(keep=False)
    problems.add("duplicated row_id", df, dup)
    problems.raise_if_any()
    return df[list(TEST_COLUMNS)].reset_index(drop=True)


def read_sample_submission(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``sample_submission.csv`` (row_id str, fractured float64 in [0, 1]).

    Checks: required columns, row ids ending in ``_<target>`` and unique, fractured a probability.
    """
    df = _read_raw(path, SUBMISSION_COLUMNS)
    problems = _Problems(path)
    suffix_ok = df["row_id"].map(lambda r: any(r.endswith(f"_{t}") and len(r) > len(t) + 1 for t in TARGETS))
    problems.add("row_id does not end in _<target> (C1..C7, patient_overall)", df, ~suffix_ok)
    problems.add("duplicated row_id", df, df["row_id"].duplicated(keep=False))
    frac = _check_numeric(df, ("fractured",), problems)["fractured"]
    problems.add("fractured outside [0, 1]", df, (frac < 0) | (frac > 1))
    problems.raise_if_any()
    return pd.DataFrame({"row_id": df["row_id"].to_numpy(dtype=object), "fractured": frac.to_numpy()})


# ------------------------------------------------------------------------------------------- validators
def _check_box_geometry(
    boxes: pd.DataFrame, problems: _Problems, image_shape: tuple[int, ...] | None = None
) -> None:
    problems.add("non-positive width or height", boxes, (boxes["width"] <= 0) | (boxes["height"] <= 0))
    problems.add("negative x or y", boxes, (boxes["x"] < 0) | (boxes["y"] < 0))
    if image_shape is not None:
        height, width = image_shape[-2:]
        outside = (boxes["x"] + boxes["width"] > width) | (boxes["y"] + boxes["height"] > height)
        problems.add(f"box outside the {height}x{width} image", boxes, outside)


def validate_boxes(
    boxes: pd.DataFrame,
    image_shape_by_uid: Mapping[str, tuple[int, ...]],
    *,
    source: str | os.PathLike[str] = BOXES_CSV,
) -> None:
    """Check box geometry against each study's image size ((…, H, W), e.g. ``study.shape``).

    Rows whose study is not in ``image_shape_by_uid`` get only the size/sign checks, so one study can
    be checked at a time. Raises :class:`CsvValidationError` naming ``source``.
    """
    problems = _Problems(source)
    _check_box_geometry(boxes, problems)
    heights = boxes[UID].map(lambda u: image_shape_by_uid[u][-2] if u in image_shape_by_uid else np.inf)
    widths = boxes[UID].map(lambda u: image_shape_by_uid[u][-1] if u in image_shape_by_uid else np.inf)
    outside = (boxes["x"] + boxes["width"] > widths.astype(float)) | (
        boxes["y"] + boxes["height"] > heights.astype(float)
    )
    problems.add("box outside its study's image", boxes, outside.to_numpy())
    problems.raise_if_any()


def validate_box_slices(
    boxes: pd.DataFrame,
    slice_numbers_by_uid: Mapping[str, Iterable[int]],
    *,
    source: str | os.PathLike[str] = BOXES_CSV,
) -> None:
    """Check each box's slice_number is a file number of its study (studies not in the map skipped)."""
    numbers = {uid: {int(n) for n in nums} for uid, nums in slice_numbers_by_uid.items()}
    bad = np.array(
        [
            uid in numbers and int(n) not in numbers[uid]
            for uid, n in zip(boxes[UID], boxes["slice_number"], strict=True)
        ],
        dtype=bool,
    )
    problems = _Problems(source)
    problems.add("slice_number is not a file of the study", boxes, bad)
    problems.raise_if_any()


# ------------------------------------------------------------------------------------------------ output
# ------------------------------------------------------------------------------------------------- index
def _empty_labels() -> pd.DataFrame:
    return pd.DataFrame(
        {t: pd.Series(dtype=np.int64) for t in TARGETS}, index=pd.Index([], dtype=object, name=UID)
    )


def _empty_boxes() -> pd.DataFrame:
    frame = {UID: pd.Series(dtype=object)}
    frame |= {c: pd.Series(dtype=np.float64) for c in ("x", "y", "width", "height")}
    return pd.DataFrame(frame | {"slice_number": pd.Series(dtype=np.int64)})


def _empty_test() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in TEST_COLUMNS})


def _subdirs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def _scan_segmentations(folder: Path, exclude: set[str]) -> dict[str, Path]:
    """``<uid>.nii`` (preferred) or ``<uid>.nii.gz`` files of ``folder``."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir(), key=lambda p: p.name.endswith(".nii")):  # .nii wins: last
        for ext in (".nii.gz", ".nii"):
            if path.is_file() and path.name.endswith(ext):
                uid = path.name[: -len(ext)]
                if uid not in exclude:
                    found[uid] = path
    return found


@dataclass
class RsnaIndex:
    """What an RSNA folder holds: labels, boxes, test rows, study folders and segmentations.

    ``labels``: int64, indexed by StudyInstanceUID, columns C1…C7, patient_overall (exclusions
    dropped; empty without train.csv). ``boxes``: as :func:`read_boxes`, excluded studies dropped.
    ``test``: as :func:`read_test`, empty without test.csv (exclusions do not apply to test rows).
    """

    root: Path
    labels: pd.DataFrame
    boxes: pd.DataFrame
    test: pd.DataFrame
    excluded: tuple[str, ...] = ()
    segmentation_paths: dict[str, Path] = field(default_factory=dict, repr=False)

    @classmethod
    def from_root(
        cls, root: str | os.PathLike[str], exclude: Iterable[str] = (), require_images: bool = True
    ) -> RsnaIndex:
        """Index the RSNA folder ``root`` (train.csv and/or test.csv, *_images/, segmentations/).

        ``exclude``: StudyInstanceUIDs dropped from training labels, boxes and segmentations (see
        :data:`KNOWN_BAD_STUDIES`). ``require_images``: every train.csv / test.csv study needs its
        folder (:class:`CsvValidationError` otherwise). Boxes must name a train.csv study. Folders under
        train_images that train.csv does not list trigger a warning.
        """
        root = Path(root).expanduser()
        _check_root(root)
        exclude_set = {str(u) for u in exclude}
        labels = read_train_labels(root / TRAIN_CSV) if (root / TRAIN_CSV).is_file() else _empty_labels()
        excluded = tuple(u for u in labels.index if u in exclude_set)
        labels = labels.drop(index=list(excluded))
        boxes = read_boxes(root / BOXES_CSV) if (root / BOXES_CSV).is_file() else _empty_boxes()
        boxes = boxes[~boxes[UID].isin(exclude_set)]
        _check_box_studies(boxes, labels, root / BOXES_CSV)
        test = read_test(root / TEST_CSV) if (root / TEST_CSV).is_file() else _empty_test()
        train_dirs, test_dirs = _subdirs(root / TRAIN_IMAGES), _subdirs(root / TEST_IMAGES)
        if require_images:
            _require_folders(list(labels.index), train_dirs, root / TRAIN_CSV, root / TRAIN_IMAGES)
            test_uids = list(dict.fromkeys(test[UID]))
            _require_folders(test_uids, test_dirs, root / TEST_CSV, root / TEST_IMAGES)
        unlisted = sorted(train_dirs - set(labels.index) - exclude_set)
        if unlisted:
            warnings.warn(
                f"{root / TRAIN_IMAGES}: {len(unlisted)} study folder(s) not in {TRAIN_CSV}, ignored: "
                f"{_listing(unlisted)}",
                stacklevel=2,
            )
        segs = _scan_segmentations(root / SEGMENTATIONS, exclude_set)
        return cls(root, labels, boxes, test, excluded, segs)

    @property
    def train_uids(self) -> list[str]:
        """Training studies in train.csv order (exclusions dropped)."""
        return list(self.labels.index)

    @property
    def test_uids(self) -> list[str]:
        """test.csv studies in order of first appearance."""
        return list(dict.fromkeys(self.test[UID]))

    @property
    def uids_with_boxes(self) -> list[str]:
        return list(dict.fromkeys(self.boxes[UID]))

    @property
    def uids_with_segmentation(self) -> list[str]:
        """Train then test studies that have ``segmentations/<uid>.nii[.gz]``."""
        known = dict.fromkeys(self.train_uids + self.test_uids)
        return [u for u in known if u in self.segmentation_paths]

    def segmentation_path(self, uid: str) -> Path | None:
        return self.segmentation_paths.get(uid)

    def study_dir(self, uid: str) -> Path:
        """``train_images/<uid>`` for a training study or folder, else ``test_images/<uid>``."""
        train_dir, test_dir = self.root / TRAIN_IMAGES / uid, self.root / TEST_IMAGES / uid
        if uid in self.labels.index or train_dir.is_dir():
            return train_dir
        if test_dir.is_dir() or uid in set(self.test[UID]):
            return test_dir
        raise KeyError(f"study {uid} is neither in {TRAIN_CSV}/{TEST_CSV} nor a folder under {self.root}")

    def slice_numbers(self, uid: str) -> list[int]:
        """File numbers (``<n>.dcm`` stems) of a study folder, sorted."""
        return sorted(int(p.stem) for p in self.study_dir(uid).glob("*.dcm") if p.stem.isdigit())

    def check_box_slices(self) -> None:
        """Check every box's slice_number names a file of its study (lists the boxed folders)."""
        numbers = {uid: self.slice_numbers(uid) for uid in self.uids_with_boxes}
        validate_box_slices(self.boxes, numbers, source=self.root / BOXES_CSV)

    def summary(self) -> dict[str, int]:
        """Counts: studies, positives per target, boxes, segmentations, test studies."""
        boxed, segmented = set(self.uids_with_boxes), set(self.uids_with_segmentation)
        out = {
            "n_train": len(self.labels),
            "n_excluded": len(self.excluded),
            "n_with_boxes": len(boxed),
            "n_boxed_slices": int(self.boxes[[UID, "slice_number"]].drop_duplicates().shape[0]),
            "n_with_segmentation": len(segmented & set(self.train_uids)),
            "n_with_boxes_and_segmentation": len(boxed & segmented),
            "n_test": len(self.test_uids),
            "n_test_rows": len(self.test),
        }
        out |= {f"n_positive_{t}": int(self.labels[t].sum()) for t in TARGETS}
        return out


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"RSNA root {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"RSNA root {root} is not a folder")
    if not (root / TRAIN_CSV).is_file() and not (root / TEST_CSV).is_file():
        entries = sorted(p.name for p in root.iterdir())
        found = _listing(entries) if entries else "the folder is empty"
        raise CervspineInputError(
            f"RSNA root {root} has neither {TRAIN_CSV} nor {TEST_CSV} (found: {found}); "
            "point data.root at the competition folder"
        )


def _check_box_studies(boxes: pd.DataFrame, labels: pd.DataFrame, path: Path) -> None:
    unknown = ~boxes[UID].isin(labels.index)
    if unknown.any():
        problems = _Problems(path)
        uids = list(dict.fromkeys(boxes.loc[unknown, UID]))
        problems.add(f"boxes for studies not in {TRAIN_CSV}: {_listing(uids)}", boxes, unknown.to_numpy())
        problems.raise_if_any()


def _require_folders(uids: list[str], folders: set[str], csv_path: Path, images: Path) -> None:
    missing = [u for u in uids if u not in folders]
    if missing:
        raise CsvValidationError(
            f"{csv_path}: {len(missing)} of {len(uids)} studies have no folder under {images}: "
            f"{_listing(missing)}"
        )


def is_synthetic(root: str | Path) -> bool:
    """True for folders made by ``cervspine.synthesize`` (they carry ``synthetic_manifest.csv``)."""
    return (Path(root) / "synthetic_manifest.csv").is_file()


def trained_on_synthetic_data(data_hp: Mapping[str, Any]) -> bool:
    """Whether a stage was trained on a generated folder, from its data hyper-parameters: the
    ``synthetic`` flag its DataModule recorded at training time, else (checkpoints made before the flag)
    whether the folder named by ``root`` still carries the generator's manifest."""
    if data_hp.get("synthetic") is not None:
        return bool(data_hp["synthetic"])
    root = data_hp.get("root")
    return bool(root) and is_synthetic(str(root))
