"""Writing a synthetic study as DICOM CT slices, with the storage quirks of the RSNA files.

Reversed slice order, file numbers not starting at 1, JPEG Lossless (our own encoder,
:mod:`cervspine.synthetic.ljpeg`) / RLE / JPEG 2000 (pylibjpeg) / implicit VR, signed and unsigned
pixels, 12-bit storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cervspine.synthetic.ljpeg import JPEG_LOSSLESS_SV1, encapsulate_frames, encode_frame
from cervspine.synthetic.phantom import SyntheticStudy

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "jpeg_lossless": JPEG_LOSSLESS_SV1,
    "rle": "1.2.840.10008.1.2.5",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}


@dataclass(frozen=True)
class DicomOptions:
    """How a study is stored (the quirks of the RSNA files)."""

    transfer_syntax: str = "explicit"
    reversed: bool = False
    first_number: int = 1
    signed: bool = True
    intercept: int | None = None  # None: -1024
    bits_stored: int = 16


def transfer_syntax_uid(name: str) -> str:
    """A transfer syntax alias (explicit, implicit, jpeg_lossless, rle, jpeg2000) or UID → UID."""
    if name in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[name]
    if name in TRANSFER_SYNTAXES.values():
        return name
    raise ValueError(
        f"unknown transfer syntax {name!r}; use one of {sorted(TRANSFER_SYNTAXES)} or their UIDs"
    )


def file_numbers(n: int, *, reversed: bool = False, first_number: int = 1) -> np.ndarray:
    """Instance (= file) number of each superior-first slice."""
    k = np.arange(n)
    return first_number + (n - 1 - k if reversed else k)


def stored_pixels(volume: np.ndarray, *, signed: bool, intercept: int, bits_stored: int) -> np.ndarray:
    """Stored values for HU = stored + intercept; raises if the HU range does not fit."""
    lo, hi = (
        (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    )
    stored = volume.astype(np.int32) - intercept
    if stored.min() < lo or stored.max() > hi:
        raise ValueError(
            f"HU range [{volume.min()}, {volume.max()}] does not fit {bits_stored}-bit "
            f"{'signed' if signed else 'unsigned'} pixels with intercept {intercept}"
        )
    return stored.astype(np.int16 if signed else np.uint16)


def _slice_dataset(
    study: SyntheticStudy, opts: DicomOptions, ts: str, number: int, index: int, intercept: int
):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    sop = f"{study.uid}.1.{number}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(f"{number}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    md = study.metadata
    dz, dy, dx = study.spacing
    z = float(study.z_positions[index])
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.Modality = "CT"
    ds.Manufacturer = md["Manufacturer"]
    ds.PatientName = study.uid
    ds.PatientID = study.uid
    ds.PatientSex = md["PatientSex"]
    ds.PatientAge = md["PatientAge"]
    ds.BodyPartExamined = "CSPINE"
    ds.SliceThickness = md["SliceThickness"]
    ds.KVP = md["KVP"]
    ds.ConvolutionKernel = md["ConvolutionKernel"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = f"{study.uid}.1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = int(number)
    ds.ImagePositionPatient = [study.origin[0], study.origin[1], z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = f"{study.uid}.2"
    ds.SliceLocation = z
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = study.volume.shape[1:]
    ds.PixelSpacing = [dy, dx]
    ds.BitsAllocated = 16
    ds.BitsStored = opts.bits_stored
    ds.HighBit = opts.bits_stored - 1
    ds.PixelRepresentation = int(opts.signed)
    ds.WindowCenter = md["WindowCenter"]
    ds.WindowWidth = md["WindowWidth"]
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def _set_pixels(ds, pixels: np.ndarray, ts: str, bits_stored: int) -> None:
    """Store one frame under the transfer syntax (uncompressed, JPEG Lossless, RLE or JPEG 2000)."""
    if ts in (TRANSFER_SYNTAXES["explicit"], TRANSFER_SYNTAXES["implicit"]):
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
    elif ts == JPEG_LOSSLESS_SV1:
        pattern = pixels.view(np.uint16) & np.uint16((1 << bits_stored) - 1)
        ds.PixelData = encapsulate_frames([encode_frame(pattern, bits_stored)])
        ds["PixelData"].VR = "OB"
    else:
        ds.compress(ts, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)


def write_study_dicom(
    study: SyntheticStudy,
    folder: str | Path,
    *,
    transfer_syntax: str = "explicit",
    reversed: bool = False,
    first_number: int = 1,
    signed: bool = True,
    intercept: int | None = None,
    bits_stored: int = 16,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``<folder>/<number>.dcm`` per slice; returns the paths in superior-first order.

    A folder that already holds ``.dcm`` files is refused, or emptied of them with ``overwrite``.
    """
    opts = DicomOptions(transfer_syntax, reversed, first_number, signed, intercept, bits_stored)
    ts = transfer_syntax_uid(transfer_syntax)
    icpt = -1024 if intercept is None else int(intercept)
    if bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, got {bits_stored}")
    if first_number < 0:
        raise ValueError(f"first_number must be >= 0, got {first_number}")
    stored = stored_pixels(study.volume, signed=signed, intercept=icpt, bits_stored=bits_stored)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("*.dcm"))
    if old and not overwrite:
        raise FileExistsError(f"{folder} already holds {len(old)} .dcm files; pass overwrite=True")
    for path in old:
        path.unlink()
    numbers = file_numbers(len(stored), reversed=reversed, first_number=first_number)
    paths = []
    for i, number in enumerate(numbers):
        ds = _slice_dataset(study, opts, ts, int(number), i, icpt)
        _set_pixels(ds, stored[i], ts, bits_stored)
        path = folder / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
