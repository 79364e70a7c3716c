"""What several test files share: the tiny folder's settings, composing configs, DICOM/NIfTI writers, a
real full disk, and the read-only guard of the session-wide folders. Fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cervspine.config import composed
from cervspine.io import Study

REPO = Path(__file__).resolve().parents[1]
hydra_config = composed  # the tests' name for it

# ------------------------------------------------------------------------------------- the tiny folder

TINY = dict(n_train=12, n_test=2, size=64, slices=(40, 52), seed=3, seg_fraction=0.75, box_fraction=0.5)
# Settings that make the demo experiments tiny and fast on the tiny folder.
TINY_DATA = ["data.image_size=64", "data.n_folds=3", "data.num_workers=0", "data.preprocess_workers=1"]
TINY_STAGE1 = ["data.input_size=64", "data.batch_size=16"]
TINY_STAGE2 = ["data.input_size=32", "data.batch_size=16", "data.epoch_size=64"]
SEQ = ["data.n_slices=4"]  # the sequence model: few slices per vertebra
TINY_CACHE = Path(".cervspine_cache") / "s64"  # the tiny folder's cache (built once, read-only)
# one optimizer step on timm's 0.4M-parameter test_resnet: for tests of the machinery, not of learning
ONE_STEP = ["model.backbone.name=test_resnet", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
            "+trainer.limit_val_batches=1", "+trainer.enable_progress_bar=false"]  # fmt: skip


def train_overrides(root: Path, experiment: str = "fracture_demo", *extra: str) -> list[str]:
    """A train experiment on the tiny folder at its tiny stage settings."""
    stage = TINY_STAGE1 if experiment.startswith("vertebrae") else TINY_STAGE2
    seq = SEQ if experiment.startswith("fracture_seq") else []
    return [f"experiment={experiment}", f"data.root={root}", *TINY_DATA, *stage, *seq, "print_config=false",
            *extra]  # fmt: skip


def tiny_pipeline_overrides(
    root: Path, experiment: str, stage1: tuple[str, ...] = (), **stage2: list[str]
) -> list[str]:
    """Pipeline overrides for a one-epoch, two-batch run of ``experiment`` on the tiny folder.
    ``stage1``: extra train overrides of stage 1; ``stage2``: extra train overrides per stage-2 key
    (``stage2=[...]``, ``stage2_ensemble__seq=[...]`` for the ensemble member ``seq``); both added to the
    tiny settings, which replace the experiment's own stage overrides."""
    short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2"]
    stage_data = [o for o in TINY_DATA if not o.startswith(("data.image_size", "data.n_folds"))]

    def quoted(items: list[str]) -> str:
        return "[" + ",".join(f'"{x}"' for x in items) + "]"

    out = [
        f"data.root={root}",
        f"experiment={experiment}",
        "data.image_size=64",
        "data.n_folds=3",
        "n_bootstrap=20",
        "progress=false",
        f"stage1.overrides={quoted([*short, *stage_data, *TINY_STAGE1, *stage1])}",
    ]
    for key, extra in {"stage2": [], **stage2}.items():
        path = key.replace("__", ".")
        out.append(f"{path}.overrides={quoted([*short, *stage_data, *TINY_STAGE2, *extra])}")
    return out


# The one trained run the tests share (conftest's ``shared_run``): stage 1, the slice stage 2 (stage2/)
# and the sequence stage 2 (stage2_seq/) of demo_ensemble, with the evaluation and study reports; every
# stage on timm's 0.4M-parameter test_resnet (the tests check the job, not what a network learns).
REPORTS = ['evaluate.overrides=["report=true"]', 'predict.overrides=["report=true"]']
TEST_BACKBONE = "model.backbone.name=test_resnet"


def shared_run_overrides(root: Path) -> list[str]:
    stages = tiny_pipeline_overrides(
        root, "demo_ensemble", stage1=[TEST_BACKBONE], stage2=[TEST_BACKBONE],
        stage2_ensemble__seq=[*SEQ, TEST_BACKBONE],
    )  # fmt: skip
    return [*stages, *REPORTS]


# ---------------------------------------------------------------------------- read-only shared folders


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every path below ``folder`` → (mode, size, mtime_ns): what a test must not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    added = [f"+ {p}" for p in sorted(set(after) - set(before))]
    removed = [f"- {p}" for p in sorted(set(before) - set(after))]
    changed = [f"~ {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return added + removed + changed


def set_writable(folder: Path, writable: bool) -> None:
    """chmod the tree a-w (or back u+w): a write into a shared folder then fails loudly (unless root)."""
    for dirpath, _, filenames in os.walk(folder):
        for p in [Path(dirpath), *(Path(dirpath) / f for f in filenames)]:
            mode = p.stat().st_mode
            p.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable_copy(src: Path, dst: Path, *ignore: str) -> Path:
    """A private, writable copy of a (read-only) shared folder, without the ``ignore`` patterns."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
    set_writable(dst, True)
    return dst


# ----------------------------------------------------------------------------------------- DICOM, NIfTI

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    position: tuple[float, float, float],
    instance: int | None,
    series_uid: str,
    study_uid: str = "1.2.3.4",
    orientation: tuple[float, ...] = AXIAL,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    spacing: tuple[float, float] = (0.5, 0.6),
    bits_stored: int | None = None,
    syntax: str = ExplicitVRLittleEndian,
    extra: dict | None = None,
) -> Path:
    """One single-frame grayscale slice written with pydicom (int16 → signed, uint16 → unsigned)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    if instance is not None:
        ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    n: int = 6,
    *,
    shape: tuple[int, int] = (6, 5),
    dz: float = 2.0,
    reversed_storage: bool = False,
    first_instance: int = 1,
    names: list[str] | None = None,
    orientation: tuple[float, ...] = AXIAL,
    series_uid: str | None = None,
    **kwargs,
) -> tuple[list[Path], np.ndarray]:
    """A series whose slice k (0 = most superior) is filled with 100 * k + pixel index.

    Returns the files (superior first) and the expected HU volume (intercept −1024 unless given).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    normal = -normal if normal[2] < 0 else normal
    files, expected = [], []
    for k in range(n):
        pixels = (100 * k + np.arange(shape[0] * shape[1]).reshape(shape)).astype(np.int16)
        instance = first_instance + (n - 1 - k if reversed_storage else k)
        name = names[k] if names else f"{instance}.dcm"
        position = tuple(np.array([-10.0, 20.0, 50.0]) - k * dz * normal)
        write_slice(
            folder / name, pixels, position=position, instance=instance, series_uid=series_uid,
            orientation=orientation, **kwargs,
        )  # fmt: skip
        files.append(folder / name)
        expected.append(
            pixels.astype(np.float64) * kwargs.get("slope", 1.0) + kwargs.get("intercept", -1024.0)
        )
    return files, np.stack(expected)


def labels_like(study: Study, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 20, size=study.shape, dtype=np.uint8)


def nifti_from_volume(seg: np.ndarray, study: Study, perm: tuple[int, ...], flips: tuple[bool, ...]):
    """A NIfTI array with data axis a = volume axis perm[a] (reversed where flips[a]) + its exact affine."""
    data = np.transpose(seg, perm)
    o = np.asarray(study.orientation)
    dz, dy, dx = study.spacing
    steps = [study.positions[1] - study.positions[0], dy * o[3:], dx * o[:3]]  # LPS step per volume axis
    lps = np.eye(4)
    lps[:3, 3] = study.positions[0]
    for a, b in enumerate(perm):
        lps[:3, a] = -steps[b] if flips[a] else steps[b]
        if flips[a]:
            data = np.flip(data, axis=a)
            lps[:3, 3] += (seg.shape[b] - 1) * steps[b]
    return np.ascontiguousarray(data), LPS_TO_RAS @ lps


# ------------------------------------------------------------------------------------- faults


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (a real full disk); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class StepBeacon(L.Callback):
    """Run inside a training subprocess (``+callbacks.beacon._target_=tests.helpers.StepBeacon``): writes
    the global step after every batch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        os.replace(tmp, self.path)


class LrProbe(L.Callback):
    """``+callbacks.lr_probe._target_=tests.helpers.LrProbe``: the learning rate at every training batch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))


PREMOVE = Path(__file__).parent / "data" / "premove"  # committed tiny models (an untrained stage 1)


def answer_with_true_levels(out: Path, *, seed: int = 11, size: int = 192, n_slices: int = 72) -> dict:
    """A synthetic study (``out/ct``, 2 mm slices, C5 fractured) answered by the real report and DICOM
    writers into ``out/dicom``: the stage-2 answer is the committed test models'; their stage 1 is
    untrained (no level reaches a visibility of 0.5), so stage 1's table is the generator's truth (each
    level's slices and the spine's box, from its labels; the table's own schema) — every level localised
    where it really is, as a trained stage 1 has it, and a SEG with a segment per level."""
    from dataclasses import replace

    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.cache.entry import area_fractions, spine_boxes, vertebra_areas
    from cervspine.data.stage1_table import Stage1Output
    from cervspine.dicom.results import results_for_study
    from cervspine.inference import Predictor
    from cervspine.io import load_study
    from cervspine.jobs.records import study_record
    from cervspine.report.study import write_study_report
    from cervspine.scoring.thresholds import OperatingThreshold
    from cervspine.synthetic import write_study

    ct = out / "ct"
    truth = write_study(ct, seed=seed, size=size, n_slices=n_slices, slice_spacing=2.0, fractured=["C5"])
    predictor = Predictor.from_checkpoints(PREMOVE / "stage1.ckpt", [PREMOVE / "slice.ckpt"], device="cpu")
    source = load_study(out / "ct")
    study = InMemoryStudy(source, CacheParams(image_size=predictor.image_size))
    stage1 = Stage1Output(area_fractions(vertebra_areas(truth.labels)), spine_boxes(truth.labels))
    pred = replace(predictor.predict(study), slice_table=stage1.frame(study), stage1=stage1, not_localised=[])
    thresholds = OperatingThreshold(0.055, 0.06, "set for the tests")
    report = write_study_report(out / "report", study, pred, predictor, synthetic=True, threshold=thresholds)
    results = results_for_study(out / "dicom", source, pred, report, predictor, thresholds, synthetic=True)
    return {"uid": pred.uid, "ct": out / "ct", "results": results, "record": study_record(pred, thresholds),
            "truth": truth, "pred": pred}  # fmt: skip
