"""The levels as a DICOM Segmentation (highdicom ``Segmentation``, BINARY): one segment per level stage 1
found, C1…C7 with their SNOMED CT codes, painted as stage 1's box on every slice of that level (where two
levels meet, the more visible one), so a viewer overlays on the CT which level the model meant.

The SEG refers to the source series and has a frame for every source slice and segment, empty ones
included: viewers that map frames to slices by their order drew a SEG that omits empty frames shifted
(MONAI Deploy issue 397). Each segment's label states the level's study-level answer in words, the same
number the SR, the key images and the report give.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from cervspine import VERTEBRAE
from cervspine.dicom import codes as cs
from cervspine.dicom.algorithm import Algorithm, series_description
from cervspine.dicom.regions import slice_levels, source_box
from cervspine.dicom.source import SourceSeries
from cervspine.dicom.sr import UTF8
from cervspine.scoring.levels import LevelAnswer

SEG_SERIES_NUMBER = 9902
# distinct colours per level (CIELab from sRGB), as a viewer draws the segments
LEVEL_RGB = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
             (70, 240, 240)]  # fmt: skip


def level_mask(source: SourceSeries, table) -> np.ndarray:
    """(Z, Rows, Columns) uint8: each slice's level (1 = C1 … 7 = C7) inside stage 1's box, 0 elsewhere."""
    shapes = {(int(h.Rows), int(h.Columns)) for h in source.headers}
    if len(shapes) != 1:
        raise ValueError(f"source slices of {len(shapes)} matrix sizes: {sorted(shapes)}")
    rows, cols = shapes.pop()
    boxes = table[["box_y0", "box_x0", "box_y1", "box_x1"]].to_numpy(np.float64)
    levels = slice_levels(table)
    mask = np.zeros((len(source.headers), rows, cols), dtype=np.uint8)
    for z in np.flatnonzero(levels):
        c0, r0, c1, r1 = (int(round(e)) for e in source_box(boxes[z], rows, cols))  # nearest pixel edges
        mask[z, r0:r1, c0:c1] = levels[z]
    return mask


def build_seg(
    source: SourceSeries,
    table,
    answers: list[LevelAnswer],
    algorithm: Algorithm,
    *,
    series_uid: str,
    sop_uid: str | None = None,
) -> hd.seg.Segmentation | None:
    """The SEG of the levels in ``table`` (the study's stage-1 rows), labelled with ``answers`` (TARGETS
    order); None when stage 1 found no level (nothing to draw)."""
    mask = level_mask(source, table)
    present = [int(v) for v in np.unique(mask) if v]
    if not present:
        return None
    numbered = np.zeros(len(VERTEBRAE) + 1, dtype=np.uint8)  # level → segment number 1..n, as SEG asks
    numbered[present] = np.arange(1, len(present) + 1)
    alg = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=answers[level - 1].short(),
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=cs.SITES[VERTEBRAE[level - 1]],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=alg,
            display_color=hd.color.CIELabColor.from_rgb(*LEVEL_RGB[level - 1]),
        )
        for i, level in enumerate(present, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=source.evidence(),
        pixel_array=numbered[mask],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=series_uid,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_uid or hd.UID(),
        instance_number=1,
        manufacturer="cervspine project",
        manufacturer_model_name=f"{algorithm.name} {algorithm.version}"[:64],
        software_versions=algorithm.version[:64],
        device_serial_number=algorithm.device_uid[-16:],
        omit_empty_frames=False,
        content_label="LEVELS",
        content_description="vertebra levels located by the AI (stage-1 boxes)",
        series_description=series_description("AI vertebra levels", algorithm.synthetic),
        specific_character_set=UTF8,
    )
    return seg
