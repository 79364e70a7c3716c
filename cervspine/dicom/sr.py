"""The Structured Report of a scored study: a TID 1500 Measurement Report in a Comprehensive 3D SR.

One measurement group (TID 1501) per target — C1…C7 and the patient level. Its tracking identifier states
the answer in words ("C5: fracture suspected - probability 83.1%, operating point 31.0%"); the finding
*Fracture of bone* at its site; the probability and the operating point as measurements in percent, the
probability inferred from an **image region** — a closed rectangle on the source CT slice where the model
placed that level (stage 1's box on the level's most telling slice, :mod:`.regions`; a level stage 1 did
not find: the whole middle slice, said so in words and by a coded evaluation); the call as a qualitative
evaluation for machines (Positive = fracture suspected, see :mod:`.codes`); the algorithm identification;
the answer and the use notice again as comments. That form is what OHIF draws: each box on its slice, its
text beside it (a TID 1410 planar ROI group was drawn too, but OHIF showed only its numbers and offered a
"tracking" it then failed to load). The report's notices (NOT FOR DIAGNOSTIC USE, PRELIMINARY/UNVERIFIED,
SYNTHETIC where it holds, the algorithm) are in the series description and a comment container. The SR
sits in the source study (patient and study copied), in a new series, with every source instance as
evidence (Current Requested Procedure Evidence). :func:`read_sr` reads the values back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes

from cervspine import TARGETS
from cervspine.dicom import codes as cs
from cervspine.dicom.algorithm import NOT_FOR_DIAGNOSIS, SYNTHETIC_NOTE, Algorithm, series_description
from cervspine.dicom.regions import Region
from cervspine.dicom.source import SourceSeries
from cervspine.scoring.levels import LevelAnswer, level_answers
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)
SR_SERIES_NUMBER = 9901
UTF8 = "ISO_IR 192"  # every text (the source's names included) encodes, whatever the source's set
PRELIMINARY = "PRELIMINARY, UNVERIFIED: not reviewed by a radiologist"


def _algorithm_id(algorithm: Algorithm) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=algorithm.parameters()
    )


def _comment(text: str) -> TextContentItem:
    return TextContentItem(name=cs.COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)


def _group(
    answer: LevelAnswer, region: Region, source: SourceSeries, algorithm: Algorithm
) -> MeasurementsAndQualitativeEvaluations:
    box = CoordinatesForMeasurement(
        graphic_type=GraphicTypeValues.POLYLINE,
        graphic_data=region.polyline(),
        source_image=SourceImageForRegion(*source.instance(region.slice_index)),
    )
    measurements = [
        Measurement(
            name=cs.PROBABILITY,
            value=100.0 * answer.probability,
            unit=cs.PERCENT,
            referenced_coordinates=[box],
        )
    ]
    if answer.threshold is not None:
        measurements.append(Measurement(name=cs.THRESHOLD, value=100.0 * answer.threshold, unit=cs.PERCENT))
    evaluations = []
    if answer.suspected is not None:
        evaluations.append(
            QualitativeEvaluation(cs.FRACTURE, cs.SUSPECTED if answer.suspected else cs.NOT_SUSPECTED)
        )
    if not answer.localised:
        evaluations.append(QualitativeEvaluation(cs.LOCALISATION, cs.NOT_LOCALISED))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=answer.sentence()),
        finding_type=cs.FRACTURE,
        finding_sites=[FindingSite(cs.SITES[answer.target])],
        algorithm_id=_algorithm_id(algorithm),
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )
    notice = ("SYNTHETIC - " if algorithm.synthetic else "") + "NOT FOR DIAGNOSTIC USE"
    group[0].ContentSequence.extend([_comment(answer.sentence()), _comment(notice)])
    return group


def _notices(algorithm: Algorithm) -> ContainerContentItem:
    """The use notice, the report's status, SYNTHETIC where it holds and the algorithm, as comments."""
    texts = [NOT_FOR_DIAGNOSIS, PRELIMINARY, f"algorithm: {algorithm.name} {algorithm.version}"]
    if algorithm.synthetic:
        texts.insert(1, SYNTHETIC_NOTE)
    container = ContainerContentItem(
        name=cs.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = [
        TextContentItem(name=cs.COMMENT, value=t, relationship_type=RelationshipTypeValues.CONTAINS)
        for t in texts
    ]
    return container


def build_sr(
    source: SourceSeries,
    probabilities: np.ndarray,
    thresholds: OperatingThreshold | None,
    algorithm: Algorithm,
    regions: dict[str, Region],
    *,
    not_localised: list[str] = (),
    series_uid: str | None = None,
    sop_uid: str | None = None,
    previous: list | None = None,
) -> Comprehensive3DSR:
    """The SR of one scored study. ``regions``: target → its :class:`~.regions.Region` (every target);
    ``not_localised``: the levels stage 1 did not find. ``previous``: earlier SRs of the same series that
    this one replaces (Predecessor Documents)."""
    answers = level_answers(probabilities, thresholds, not_localised)
    missing = [t for t in TARGETS if t not in regions]
    if missing:
        raise ValueError(f"no image region for {missing}: every target's group points at one")
    groups = [_group(a, regions[a.target], source, algorithm) for a in answers]
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name="cervspine project",
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )
    referenced = sorted({r.slice_index for r in regions.values()})
    context = ObservationContext(observer_device_context=device)
    report = _report(context, groups, [source.headers[z] for z in referenced])
    report[0].ContentSequence.append(_notices(algorithm))
    return Comprehensive3DSR(
        evidence=source.evidence(),
        content=report[0],
        series_instance_uid=series_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid or hd.UID(),
        instance_number=1,
        manufacturer="cervspine project",
        is_complete=True,
        is_final=False,
        previous_versions=previous or None,
        series_description=series_description("fracture AI report", algorithm.synthetic),
        specific_character_set=UTF8,
    )


def _report(context: ObservationContext, groups: list, library: list) -> MeasurementReport:
    """The TID 1500 content; without the image library (TID 1600) when highdicom cannot describe the
    referenced slices from their headers (an incomplete geometry), with a warning."""
    kwargs = dict(observation_context=context, procedure_reported=cs.PROCEDURE, imaging_measurements=groups)
    if library:
        try:
            return MeasurementReport(**kwargs, referenced_images=library)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            log.warning("SR without an image library: %s: %s", type(e).__name__, e)
    return MeasurementReport(**kwargs)


@dataclass
class SrContents:
    """What :func:`read_sr` finds, per target (TARGETS order for arrays): the probabilities (8,), the calls
    (None without an operating point), the thresholds, the words of each tracking identifier, whether the
    level was localised, its region (source SOP Instance UID, (5, 2) polyline), the algorithm parameters
    and the evidence."""

    probabilities: np.ndarray
    suspected: dict[str, bool | None]
    thresholds: dict[str, float | None]
    labels: dict[str, str]
    localised: dict[str, bool]
    regions: dict[str, tuple[str, np.ndarray]]
    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: list[str]
    comments: list[str]
    evidence: list[tuple[str, str, str, str]]
    study_uid: str
    not_for_diagnosis: bool

    @property
    def source_images(self) -> dict[str, list[str]]:
        """Target → the source SOP Instance UIDs its group refers to (its region's slice)."""
        return {t: [uid] for t, (uid, _) in self.regions.items()}


def _percent(group, name) -> float | None:
    """A group's measurement ``name`` (stored in percent) as a probability; None when absent."""
    found = group.get_measurements(name=name)
    return None if not found else float(found[0].value) / 100.0


def read_sr(path: str | Path) -> SrContents:
    """Read a cervspine SR back with highdicom (``highdicom.sr.srread``)."""
    sr = hd.sr.srread(path)
    probs = np.full(len(TARGETS), np.nan)
    out: dict[str, dict] = {k: {} for k in ("suspected", "thresholds", "labels", "localised", "regions")}
    name = version = ""
    params: list[str] = []
    for group in sr.content.get_image_measurement_groups():
        sites = [s.value for s in group.finding_sites]
        target = cs.TARGET_OF_SITE.get(sites[0].value) if sites else None
        if target is None:
            continue
        probs[TARGETS.index(target)] = _percent(group, cs.PROBABILITY)
        out["thresholds"][target] = _percent(group, cs.THRESHOLD)
        calls = group.get_qualitative_evaluations(name=cs.FRACTURE)
        out["suspected"][target] = (calls[0].value == cs.SUSPECTED) if calls else None
        out["localised"][target] = not group.get_qualitative_evaluations(name=cs.LOCALISATION)
        out["labels"][target] = str(group.tracking_identifier)
        box = group.get_measurements(name=cs.PROBABILITY)[0].referenced_coordinates[0]
        uid = str(box.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        out["regions"][target] = (uid, np.asarray(box.GraphicData, dtype=np.float64).reshape(-1, 2))
        for item in group[0].ContentSequence:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            if meaning == "Algorithm Name":
                name = str(item.TextValue)
            elif meaning == "Algorithm Version":
                version = str(item.TextValue)
            elif meaning == "Algorithm Parameters" and target == TARGETS[0]:
                params.append(str(item.TextValue))
    comments = [
        str(item.TextValue)
        for container in sr.ContentSequence
        if container.ConceptNameCodeSequence[0].CodeValue == cs.QUALITATIVE_EVALUATIONS.value
        for item in container.ContentSequence
    ]
    return SrContents(
        probs,
        **out,
        algorithm_name=name,
        algorithm_version=version,
        algorithm_parameters=params,
        comments=comments,
        evidence=[tuple(str(u) for u in e) for e in sr.get_evidence(current_procedure_only=True)],
        study_uid=str(sr.StudyInstanceUID),
        not_for_diagnosis=NOT_FOR_DIAGNOSIS in params,
    )
