"""A scored study's DICOM results: the SR (:mod:`.sr`) and the key images (:mod:`.key_images`), made with
new UIDs in the source study, written durably into one folder.

``python -m cervspine.predict study=DIR run_dir=R dicom_out=OUT`` and the DICOM node both call
:func:`write_dicom_results`; the folder holds ``sr.dcm`` and ``key_<n>_<name>.dcm``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np

from cervspine import TARGETS, VERTEBRAE
from cervspine.dicom.algorithm import Algorithm
from cervspine.dicom.files import write_dataset_atomic
from cervspine.dicom.key_images import key_image, png_rgb
from cervspine.dicom.source import SourceSeries
from cervspine.dicom.sr import build_sr
from cervspine.inference import StudyPrediction
from cervspine.scoring.thresholds import OperatingThreshold

KEY_FIGURES = {
    "reformats": "sagittal and coronal reformats with the detected vertebra levels",
    "probabilities": "fracture probability per vertebra at the operating point",
    "key_slices": "the slices that drove the decision, with Grad-CAM",
}


@dataclass
class DicomResults:
    """What was written: the SR and key image files and the UIDs they were given."""

    folder: Path
    sr: Path
    key_images: list[Path]
    sr_uid: str
    series_uids: dict[str, str]  # "sr" / "key_images" → the new series' UIDs
    key_slices: dict[str, list[int]] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [self.sr, *self.key_images]


def driving_slices(pred: StudyPrediction, report_key_slices: list[int]) -> dict[str, list[int]]:
    """Target → the slice indices that drove it: per level, the stage-2 slice with that level's highest
    fracture probability; the patient level, the report's key slices."""
    out: dict[str, list[int]] = {}
    z, probs = np.asarray(pred.fracture_slices), np.asarray(pred.fracture_probs)
    if len(z):
        for j, v in enumerate(VERTEBRAE):
            out[v] = [int(z[int(np.argmax(probs[:, j]))])]
    out[TARGETS[-1]] = [int(k) for k in report_key_slices]
    return out


def write_dicom_results(
    out_dir: str | Path,
    source: SourceSeries,
    pred: StudyPrediction,
    pngs: dict[str, Path],
    report_key_slices: list[int],
    thresholds: OperatingThreshold | None,
    algorithm: Algorithm,
    *,
    previous: list | None = None,
) -> DicomResults:
    """Write the SR and one key image per report figure in ``pngs`` (names of :data:`KEY_FIGURES`)."""
    out = Path(out_dir)
    key = driving_slices(pred, report_key_slices)
    series = {"sr": hd.UID(), "key_images": hd.UID()}
    sr = build_sr(
        source, pred.probabilities, thresholds, algorithm, key, series_uid=series["sr"], previous=previous
    )
    images = []
    for n, (name, what) in enumerate(((k, v) for k, v in KEY_FIGURES.items() if k in pngs), start=1):
        slices = key[TARGETS[-1]] if name == "key_slices" else []
        sc = key_image(
            source,
            png_rgb(pngs[name]),
            what,
            algorithm,
            series_uid=series["key_images"],
            instance_number=n,
            source_slices=slices,
        )
        images.append(write_dataset_atomic(sc, out / f"key_{n}_{name}.dcm"))
    sr_path = write_dataset_atomic(sr, out / "sr.dcm")  # last: a folder with sr.dcm is complete
    return DicomResults(out, sr_path, images, str(sr.SOPInstanceUID), series, key)


def results_for_study(
    out_dir: str | Path,
    study,
    pred: StudyPrediction,
    report,
    predictor,
    thresholds: OperatingThreshold | None,
    *,
    synthetic: bool,
    previous: list | None = None,
) -> DicomResults:
    """The DICOM results of a study scored in memory: ``study`` the :class:`cervspine.io.Study` read
    from the source series, ``report`` its :class:`cervspine.report.study.StudyReport`."""
    notes = ()
    if thresholds is not None:
        notes = (
            f"operating point: fracture suspected when p > {thresholds.vertebra:.4f} (C1-C7) or "
            f"p > {thresholds.patient:.4f} (patient); {thresholds.rule}",
        )
    algorithm = Algorithm.of(predictor, synthetic=synthetic, notes=notes)
    with warnings.catch_warnings():  # RSNA's PatientName is the study UID: highdicom warns about its form
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return write_dicom_results(
            out_dir,
            SourceSeries.from_files(list(study.files)),
            pred,
            report.pngs,
            [k.slice_index for k in report.key_slices],
            thresholds,
            algorithm,
            previous=previous,
        )
