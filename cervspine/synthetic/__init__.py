"""The synthetic RSNA 2022 data generator: CT phantoms written as real DICOM, NIfTI and competition CSVs.

Modules, from the top of the data flow down:

- ``folder``: ``write_rsna_folder`` (a complete RSNA-layout folder with its CSVs), ``write_study``.
- ``variants``: presets (``VARIANTS``: default, uniform, coverage, fov, thickness, subtle, hard) of the
  options that remove the generator's easy cues; ``folder_spec`` resolves one into a ``FolderSpec``.
- ``plan``: ``FolderSpec`` → ``StudyPlan`` s (labels, geometry, storage ``Quirks``), decided from one seed.
- ``dicom_writer``: ``write_study_dicom`` and the storage options (``DicomOptions``, transfer syntaxes).
- ``nifti_writer``: ``write_segmentation_nifti`` (labels in the RSNA array orientation, optional noise).
- ``ljpeg``: the lossless JPEG (SV1) encoder that pydicom lacks.
- ``phantom``: ``make_phantom`` (``PhantomParams`` → ``SyntheticStudy``), rendered slice by slice.
- ``render``: drawing one slice (soft tissue, discs, bones, fracture gaps and their boxes).
- ``coverage``: the scanned z window (fitted, full, random) and the spine's in-plane placement.
- ``fractures``: fracture sites (planes with a gap and a fragment shift; subtle ones; kept in the scan).
- ``anatomy``: one study's drawn anatomy (level layout, bones, discs, soft-tissue knots).
- ``shapes``: the 2-D SDF shapes, extruded parts, components and bones it is built from.
"""

from cervspine.synthetic.dicom_writer import (
    TRANSFER_SYNTAXES,
    DicomOptions,
    file_numbers,
    transfer_syntax_uid,
    write_study_dicom,
)
from cervspine.synthetic.folder import write_planned_study, write_rsna_folder, write_study
from cervspine.synthetic.nifti_writer import (
    segmentation_affine,
    to_rsna_orientation,
    write_segmentation_nifti,
)
from cervspine.synthetic.phantom import PAD_HU, UID_ROOT, PhantomParams, SyntheticStudy, make_phantom
from cervspine.synthetic.plan import FolderSpec, Quirks, StudyPlan, plan_folder
from cervspine.synthetic.variants import VARIANTS, folder_spec, resolve_options

__all__ = [
    "PAD_HU",
    "TRANSFER_SYNTAXES",
    "UID_ROOT",
    "VARIANTS",
    "DicomOptions",
    "FolderSpec",
    "PhantomParams",
    "Quirks",
    "StudyPlan",
    "SyntheticStudy",
    "file_numbers",
    "folder_spec",
    "make_phantom",
    "plan_folder",
    "resolve_options",
    "segmentation_affine",
    "to_rsna_orientation",
    "transfer_syntax_uid",
    "write_planned_study",
    "write_rsna_folder",
    "write_segmentation_nifti",
    "write_study",
    "write_study_dicom",
]
