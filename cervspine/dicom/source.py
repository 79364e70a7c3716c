"""The source series a result refers to: every instance's header in the study's slice order, and the
evidence datasets the result objects copy patient and study from.

Anonymised sources (RSNA's have no birth date, study date/time, accession number …) are fine: the
patient and general-study attributes of type 2 that a source lacks are given empty values in the copies
the results are made from — the source files are never changed, and its UIDs are kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from cervspine.io.errors import StudyReadError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type-2 attributes of the Patient and General Study modules: present (maybe empty) in every result."""


def with_type2(ds: Dataset) -> Dataset:
    """A copy of ``ds`` where each missing :data:`TYPE2_PATIENT_STUDY` attribute is present and empty."""
    out = copy.deepcopy(ds)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


@dataclass
class SourceSeries:
    """Headers of one CT series (no pixel data), index i = slice i of ``load_study``'s volume."""

    headers: list[Dataset]

    @classmethod
    def from_files(cls, files: list[Path]) -> SourceSeries:
        """Read the headers of ``files`` (a :class:`cervspine.io.Study`'s ``files``, in slice order)."""
        if not files:
            raise StudyReadError("no source files to refer to")
        headers = []
        for f in files:
            try:
                headers.append(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception as e:
                raise StudyReadError(f"{f}: cannot read the DICOM header ({type(e).__name__}: {e})") from e
        for f, h in zip(files, headers):
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                if not str(h.get(keyword, "") or ""):
                    raise StudyReadError(f"{f}: no {keyword}: results cannot refer to this instance")
        studies = {str(h.StudyInstanceUID) for h in headers}
        if len(studies) != 1:
            raise StudyReadError(f"{files[0].parent}: instances of {len(studies)} studies: {sorted(studies)}")
        patients = {str(h.get("PatientID", "") or "") for h in headers}
        if len(patients) != 1:  # the IDs are patient data: counted, not named
            raise StudyReadError(
                f"{files[0].parent}: instances of {len(patients)} patients (PatientID differs)"
            )
        return cls(headers)

    @property
    def study_uid(self) -> str:
        return str(self.headers[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.headers[0].SeriesInstanceUID)

    def reference(self) -> Dataset:
        """The dataset results copy patient and study from (the first instance, type-2 completed)."""
        return with_type2(self.headers[0])

    def evidence(self) -> list[Dataset]:
        """Every instance as evidence, the first one type-2 completed (highdicom copies from it)."""
        return [self.reference(), *self.headers[1:]]

    def instance(self, slice_index: int) -> tuple[str, str]:
        """(SOP Class UID, SOP Instance UID) of slice ``slice_index``."""
        h = self.headers[int(slice_index)]
        return str(h.SOPClassUID), str(h.SOPInstanceUID)
