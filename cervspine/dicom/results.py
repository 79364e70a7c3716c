"""A scored study's DICOM results: the SR (:mod:`.sr`), the SEG of the levels (:mod:`.seg`) and the key
images (:mod:`.key_images`), made with new UIDs in the source study, written durably into one folder.

``python -m cervspine.predict study=DIR run_dir=R dicom_out=OUT`` and the DICOM node both call
:func:`write_dicom_results`; the folder holds ``key_<n>_<name>.dcm``, ``seg.dcm`` and ``sr.dcm`` (written
last), each of :data:`OBJECTS` unless left out (``dicom_objects=[sr,seg]``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd

from cervspine.dicom.algorithm import Algorithm
from cervspine.dicom.files import write_dataset_atomic
from cervspine.dicom.key_images import key_image, png_rgb
from cervspine.dicom.regions import Region, level_regions
from cervspine.dicom.seg import build_seg
from cervspine.dicom.source import SourceSeries
from cervspine.dicom.sr import build_sr
from cervspine.inference import StudyPrediction
from cervspine.scoring.levels import level_answers
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)
OBJECTS = ("sr", "seg", "key_images")
"""The DICOM results a study can get; ``dicom_objects`` names the ones to write."""
KEY_FIGURES = {
    "reformats": ("sagittal and coronal reformats with the detected vertebra levels", "reformats image"),
    "probabilities": ("fracture probability per vertebra at the operating point", "probabilities image"),
    "key_slices": ("the slices that drove the decision, with Grad-CAM", "key slices image"),
}
"""Report figure → (what it shows, its series' title)."""


def check_objects(objects: Sequence[str]) -> tuple[str, ...]:
    """``objects`` as a tuple, refused (naming the known ones) when one is unknown or none is left."""
    unknown = [o for o in objects if o not in OBJECTS]
    if unknown or not objects:
        raise ValueError(f"dicom_objects {list(objects)}: unknown {unknown}; choose from {list(OBJECTS)}")
    return tuple(objects)


@dataclass
class DicomResults:
    """What was written: the files (None / empty where left out) and the UIDs they were given."""

    folder: Path
    sr: Path | None
    key_images: list[Path]
    sr_uid: str | None
    series_uids: dict[str, str]  # "sr" / "seg" / "key_<n>" → the new series' UIDs
    seg: Path | None = None
    regions: dict[str, Region] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """Every file, the SR last (a receiver that has the SR has the whole answer)."""
        return [*self.key_images, *([self.seg] if self.seg else []), *([self.sr] if self.sr else [])]


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
    objects: Sequence[str] = OBJECTS,
) -> DicomResults:
    """Write ``objects``: the SR, the SEG (none when stage 1 found no level) and one key image per report
    figure in ``pngs`` (names of :data:`KEY_FIGURES`)."""
    objects = check_objects(objects)
    out = Path(out_dir)
    first = source.headers[0]
    regions = level_regions(
        pred.slice_table,
        pred.fracture_slices,
        pred.fracture_probs,
        int(first.Rows),
        int(first.Columns),
        not_localised=pred.not_localised,
        key_slice=report_key_slices[0] if report_key_slices else None,
    )
    answers = level_answers(pred.probabilities, thresholds, pred.not_localised)
    series: dict[str, str] = {}
    images = []
    figures = [name for name in KEY_FIGURES if name in pngs] if "key_images" in objects else []
    for n, name in enumerate(figures, start=1):
        what, title = KEY_FIGURES[name]
        series[f"key_{n}"] = hd.UID()
        sc = key_image(
            source,
            png_rgb(pngs[name]),
            what,
            algorithm,
            series_uid=series[f"key_{n}"],
            instance_number=n,
            source_slices=list(report_key_slices) if name == "key_slices" else [],
            title=title,
        )
        images.append(write_dataset_atomic(sc, out / f"key_{n}_{name}.dcm"))
    seg_path = None
    if "seg" in objects:
        series["seg"] = hd.UID()
        seg = build_seg(source, pred.slice_table, answers, algorithm, series_uid=series["seg"])
        if seg is None:
            log.info("no SEG: stage 1 found no level in this study")
        else:
            seg_path = write_dataset_atomic(seg, out / "seg.dcm")
    sr_path = sr_uid = None
    if "sr" in objects:
        series["sr"] = hd.UID()
        sr = build_sr(
            source,
            pred.probabilities,
            thresholds,
            algorithm,
            regions,
            not_localised=pred.not_localised,
            series_uid=series["sr"],
            previous=previous,
        )
        sr_path, sr_uid = write_dataset_atomic(sr, out / "sr.dcm"), str(sr.SOPInstanceUID)  # last
    return DicomResults(out, sr_path, images, sr_uid, series, seg_path, regions)


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
    objects: Sequence[str] = OBJECTS,
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
            objects=objects,
        )
