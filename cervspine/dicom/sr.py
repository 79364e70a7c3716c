"""The Structured Report of a scored study: a TID 1500 Measurement Report in a Comprehensive 3D SR.

One measurement group (TID 1501) per target — C1…C7 and the patient level — each with the finding
*Fracture of bone* at its site, the fracture probability as a numeric measurement, the call at the
operating point as a qualitative evaluation (Positive = fracture suspected, see :mod:`.codes`), the
algorithm identification and the CT slices that drove it (source images). The SR sits in the source
study (patient and study copied), in a new series, with every source instance as evidence (Current
Requested Procedure Evidence). :func:`read_sr` reads those values back.
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
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.sr.codedict import codes

from cervspine import TARGETS
from cervspine.dicom import codes as cs
from cervspine.dicom.algorithm import NOT_FOR_DIAGNOSIS, Algorithm
from cervspine.dicom.source import SourceSeries
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)
SR_SERIES_NUMBER = 9901
UTF8 = "ISO_IR 192"  # every text (the source's names included) encodes, whatever the source's set


def _algorithm_id(algorithm: Algorithm) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, parameters=algorithm.parameters()
    )


def _group(
    j: int,
    probability: float,
    thresholds: OperatingThreshold | None,
    algorithm: Algorithm,
    refs: list[tuple[str, str]],
) -> MeasurementsAndQualitativeEvaluations:
    target = TARGETS[j]
    alg = _algorithm_id(algorithm)
    evaluations = None
    if thresholds is not None:
        call = cs.SUSPECTED if probability > thresholds.per_target()[j] else cs.NOT_SUSPECTED
        evaluations = [QualitativeEvaluation(cs.FRACTURE, call)]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"{target} fracture"),
        finding_type=cs.FRACTURE,
        finding_sites=[FindingSite(cs.SITES[target])],
        algorithm_id=alg,
        measurements=[
            Measurement(
                name=cs.PROBABILITY,
                value=float(probability),
                unit=cs.UNITLESS,
            )
        ],
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup(c, i) for c, i in dict.fromkeys(refs)] or None,
    )


def build_sr(
    source: SourceSeries,
    probabilities: np.ndarray,
    thresholds: OperatingThreshold | None,
    algorithm: Algorithm,
    key_slices: dict[str, list[int]],
    *,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    previous: list | None = None,
) -> Comprehensive3DSR:
    """The SR of one scored study. ``key_slices``: target → the slice indices that drove it (the
    patient level: the key slices of the report). ``previous``: earlier SRs of the same series that this
    one replaces (Predecessor Documents)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(TARGETS),):
        raise ValueError(f"expected {len(TARGETS)} probabilities, got shape {probabilities.shape}")
    groups = [
        _group(j, p, thresholds, algorithm, [source.instance(z) for z in key_slices.get(t, [])])
        for j, (t, p) in enumerate(zip(TARGETS, probabilities))
    ]
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=algorithm.device_uid,
            name=algorithm.name,
            manufacturer_name="cervspine project",
            model_name=f"{algorithm.name} {algorithm.version}",
        ),
    )
    referenced = sorted({z for zs in key_slices.values() for z in zs})
    context = ObservationContext(observer_device_context=device)
    report = _report(context, groups, [source.headers[z] for z in referenced])
    synthetic = "SYNTHETIC " if algorithm.synthetic else ""
    sr = Comprehensive3DSR(
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
        series_description=f"{synthetic}cervspine fracture AI - NOT FOR DIAGNOSTIC USE",
        specific_character_set=UTF8,
    )
    return sr


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
    """What :func:`read_sr` finds: probabilities (8,) in TARGETS order, the calls (None without an
    operating point), the referenced slices per target, the algorithm parameters and the evidence."""

    probabilities: np.ndarray
    suspected: dict[str, bool | None]
    source_images: dict[str, list[str]]
    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: list[str]
    evidence: list[tuple[str, str, str, str]]
    study_uid: str
    not_for_diagnosis: bool


def read_sr(path: str | Path) -> SrContents:
    """Read a cervspine SR back with highdicom (``highdicom.sr.srread``)."""
    sr = hd.sr.srread(path)
    probs = np.full(len(TARGETS), np.nan)
    suspected: dict[str, bool | None] = {}
    images: dict[str, list[str]] = {}
    name = version = ""
    params: list[str] = []
    for group in sr.content.get_image_measurement_groups():
        sites = [s.value for s in group.finding_sites]
        target = cs.TARGET_OF_SITE.get(sites[0].value) if sites else None
        if target is None:
            continue
        j = TARGETS.index(target)
        probs[j] = group.get_measurements(name=cs.PROBABILITY)[0].value
        calls = group.get_qualitative_evaluations(name=cs.FRACTURE)
        suspected[target] = (calls[0].value == cs.SUSPECTED) if calls else None
        images[target] = [str(i.referenced_sop_instance_uid) for i in group.source_images]
        for item in group[0].ContentSequence:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            if meaning == "Algorithm Name":
                name = str(item.TextValue)
            elif meaning == "Algorithm Version":
                version = str(item.TextValue)
            elif meaning == "Algorithm Parameters" and target == TARGETS[0]:
                params.append(str(item.TextValue))
    return SrContents(
        probs,
        suspected,
        images,
        name,
        version,
        params,
        [tuple(str(u) for u in e) for e in sr.get_evidence(current_procedure_only=True)],
        str(sr.StudyInstanceUID),
        NOT_FOR_DIAGNOSIS in params,
    )
