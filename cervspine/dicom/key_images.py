"""Key images of a scored study as DICOM Secondary Capture (highdicom ``SCImage``), in the source study.

Each is one of the study report's figures (the reformats with the detected levels, the probabilities at
the operating point, the Grad-CAM key slices) with a banner burned into the pixels: "NOT FOR DIAGNOSTIC
USE" and, where it holds, "SYNTHETIC". ``BurnedInAnnotation`` says so too. Each figure is the one image
of its own series (Modality OT, as a figure of the study is): viewers play a series of several OT images
as a cine loop (OHIF does), and the figures are not frames of one scene.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from pydicom.dataset import Dataset

from cervspine.dicom.algorithm import Algorithm, series_description
from cervspine.dicom.source import SourceSeries

SC_SERIES_NUMBER = 9903  # the first key image's series; the n-th is SC_SERIES_NUMBER + n - 1
BANNER = "NOT FOR DIAGNOSTIC USE — cervspine research software, not a medical device"
BANNER_TEXT = "NOT FOR DIAGNOSTIC USE - cervspine research software, not a medical device"  # ASCII
SYNTHETIC_BANNER = "SYNTHETIC — models trained on generated data: says nothing about real CT"
BANNER_PX = 34


def banner(width: int, text: str, colour: str = "#c0392b") -> np.ndarray:
    """A (BANNER_PX, width, 3) uint8 strip with ``text`` in white on ``colour``."""
    dpi = 100
    fig = Figure(figsize=(width / dpi, BANNER_PX / dpi), dpi=dpi, facecolor=colour)
    fig.text(0.5, 0.5, text, ha="center", va="center", color="white", fontsize=12, fontweight="bold")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(rgb[:BANNER_PX, :width])


def with_banners(rgb: np.ndarray, synthetic: bool) -> np.ndarray:
    """``rgb`` (H, W, 3) with the use banner (and the SYNTHETIC one) burned in above and below."""
    w = rgb.shape[1]
    top = [banner(w, BANNER)] + ([banner(w, SYNTHETIC_BANNER, "#7d3c98")] if synthetic else [])
    return np.concatenate([*top, rgb, banner(w, BANNER)], axis=0)


def png_rgb(png: bytes | str | Path) -> np.ndarray:
    """A PNG (bytes or file) as (H, W, 3) uint8 RGB."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def key_image(
    source: SourceSeries,
    rgb: np.ndarray,
    description: str,
    algorithm: Algorithm,
    *,
    series_uid: str,
    instance_number: int,
    sop_uid: str | None = None,
    source_slices: list[int] = (),
    title: str = "key image",
) -> hd.sc.SCImage:
    """One Secondary Capture image of ``rgb`` (banners added here) in the source study: the only image of
    series ``series_uid``, the ``instance_number``-th key image (``title`` in its series description)."""
    pixels = with_banners(np.asarray(rgb, dtype=np.uint8), algorithm.synthetic)
    prefix = "SYNTHETIC " if algorithm.synthetic else ""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source.reference(),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER + instance_number - 1,
        sop_instance_uid=sop_uid or hd.UID(),
        instance_number=1,
        manufacturer="cervspine project",
        patient_orientation=("P", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        series_description=series_description(title, algorithm.synthetic),
        specific_character_set="ISO_IR 192",
    )
    sc.PatientOrientation = ""  # a figure, not an image plane: no patient orientation applies (type 2C)
    sc.BodyPartExamined = "CSPINE"  # unpaired: no Laterality (General Series, type 2C)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{prefix}{description}. {BANNER_TEXT}"[:10240]
    sc.DerivationDescription = f"{algorithm.name} {algorithm.version}: {description}"[:1024]
    refs = []
    for z in dict.fromkeys(source_slices):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = source.instance(z)
        refs.append(item)
    if refs:
        sc.SourceImageSequence = refs
    return sc
