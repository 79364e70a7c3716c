"""Reading RSNA inputs: DICOM series → :class:`Study`, NIfTI segmentations aligned to it."""

from cervspine.io.dicom import load_study
from cervspine.io.errors import CervspineInputError, CsvValidationError, SegmentationError, StudyReadError
from cervspine.io.nifti import load_segmentation
from cervspine.io.study import Study

__all__ = [
    "CervspineInputError",
    "CsvValidationError",
    "SegmentationError",
    "Study",
    "StudyReadError",
    "load_segmentation",
    "load_study",
]
