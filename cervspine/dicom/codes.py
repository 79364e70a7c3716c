"""The coded concepts of cervspine's Structured Report (all from DCM, SNOMED CT, LOINC and UCUM).

- each finding: *Fracture of bone* (SCT 125605004) at a finding site — C1…C7 vertebra (SCT) for the
  levels, *Cervical spine* (SCT 122494005) for the patient level (``patient_overall``);
- its numeric measurement: *Probability* (DCM 122157), unit *no units* (UCUM ``1``), in [0, 1];
- its qualitative evaluation at the operating point: *Fracture of bone* = *Positive* (SCT 10828004,
  fracture suspected: p > threshold) or *Negative* (SCT 260385009, not suspected); CID 250.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from cervspine import VERTEBRAE

FRACTURE = CodedConcept("125605004", "SCT", "Fracture of bone")
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
UNITLESS = CodedConcept.from_code(codes.UCUM.NoUnits)
SUSPECTED = CodedConcept.from_code(codes.SCT.Positive)
NOT_SUSPECTED = CodedConcept.from_code(codes.SCT.Negative)
CERVICAL_SPINE = CodedConcept.from_code(codes.SCT.CervicalSpine)
PROCEDURE = CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)

SITES: dict[str, CodedConcept] = {
    **{v: CodedConcept.from_code(getattr(codes.SCT, f"{v}Vertebra")) for v in VERTEBRAE},
    "patient_overall": CERVICAL_SPINE,
}
"""Finding site of each target (``TARGETS`` order)."""

TARGET_OF_SITE = {site.value: target for target, site in SITES.items()}
