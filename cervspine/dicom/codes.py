"""The coded concepts of cervspine's Structured Report (all from DCM, SNOMED CT, LOINC and UCUM).

- each finding: *Fracture of bone* (SCT 125605004) at a finding site — C1…C7 vertebra (SCT) for the
  levels, *Cervical spine* (SCT 122494005) for the patient level (``patient_overall``);
- its numeric measurements: *Probability* (DCM 122157) and the operating point's *Threshold Value* (DCM
  122411), in *percent* (UCUM ``%``): what viewers print as value + unit code reads "83.10 %";
- its qualitative evaluation at the operating point: *Fracture of bone* = *Positive* (SCT 10828004,
  fracture suspected: p > threshold) or *Negative* (SCT 260385009, not suspected); CID 250;
- for a level stage 1 did not find, *Level localisation* = *Not localised* (cervspine's own codes, the
  private scheme ``99CSPINE``): its probability is the training prior;
- the report's notices (use, algorithm, SYNTHETIC) as *Comment* (DCM 121106) text in a *Qualitative
  Evaluations* container (TID 1500 row 12).
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from cervspine import VERTEBRAE

FRACTURE = CodedConcept("125605004", "SCT", "Fracture of bone")
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
THRESHOLD = CodedConcept.from_code(codes.DCM.ThresholdValue)
PERCENT = CodedConcept("%", "UCUM", "percent")
SUSPECTED = CodedConcept.from_code(codes.SCT.Positive)
NOT_SUSPECTED = CodedConcept.from_code(codes.SCT.Negative)
CERVICAL_SPINE = CodedConcept.from_code(codes.SCT.CervicalSpine)
PROCEDURE = CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)
COMMENT = CodedConcept.from_code(codes.DCM.Comment)
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
LOCALISATION = CodedConcept("LEVELLOC", "99CSPINE", "Level localisation")
NOT_LOCALISED = CodedConcept("NOTLOCALISED", "99CSPINE", "Not localised: the training prior")

SITES: dict[str, CodedConcept] = {
    **{v: CodedConcept.from_code(getattr(codes.SCT, f"{v}Vertebra")) for v in VERTEBRAE},
    "patient_overall": CERVICAL_SPINE,
}
"""Finding site of each target (``TARGETS`` order)."""

TARGET_OF_SITE = {site.value: target for target, site in SITES.items()}
