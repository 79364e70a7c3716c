"""The lossless JPEG (process 14, SV1) encoder decodes exactly with libjpeg and through pydicom."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array

from cervspine.synthetic.ljpeg import (
    JPEG_LOSSLESS_SV1,
    encapsulate_frames,
    encode_frame,
    huffman_table,
    pack_bits,
)

libjpeg = pytest.importorskip("libjpeg")


def _dicom_roundtrip(arr: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Encode ``arr`` into an in-memory CT dataset and decode it with pydicom + pylibjpeg-libjpeg."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG_LOSSLESS_SV1
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    pattern = arr.view(np.uint16) & np.uint16((1 << bits) - 1)
    ds.PixelData = encapsulate_frames([encode_frame(pattern, bits)])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    assert pydicom.dcmread(buf).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    buf.seek(0)
    return pixel_array(buf, decoding_plugin="pylibjpeg")


def _ct_like(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    img = 1024 + 600 * np.sin(x / 23.0) * np.cos(y / 17.0) + rng.normal(0, 25, shape)
    img[(x - shape[1] / 2) ** 2 + (y - shape[0] / 2) ** 2 > (shape[0] / 2) ** 2] = 0
    return np.clip(img, 0, 4095).astype(np.uint16)


def _frames() -> dict[str, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(0)
    checker = np.indices((9, 10)).sum(axis=0) % 2
    return {
        "random16_odd": (rng.integers(0, 65536, (37, 53), dtype=np.uint16), 16),
        "checker_0_65535": ((checker * 65535).astype(np.uint16), 16),
        "category16": (np.array([[0, 32768, 0, 32768], [32768, 0, 65535, 1]], dtype=np.uint16), 16),
        "random12": (rng.integers(0, 4096, (31, 64), dtype=np.uint16), 12),
        "edges12": ((checker * 4095).astype(np.uint16), 12),
        "ct_like_128": (_ct_like(rng, (128, 128)), 12),
        "ct_like_odd": (_ct_like(rng, (67, 45)), 16),
        "constant": (np.full((7, 5), 1234, dtype=np.uint16), 16),
        "one_pixel": (np.array([[65535]], dtype=np.uint16), 16),
        "one_row": (rng.integers(0, 65536, (1, 101), dtype=np.uint16), 16),
        "one_column": (rng.integers(0, 65536, (97, 1), dtype=np.uint16), 16),
        "8bit": (rng.integers(0, 256, (20, 21), dtype=np.uint16), 8),
    }


FRAMES = _frames()


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_libjpeg_decodes_exactly(name: str) -> None:
    arr, bits = FRAMES[name]
    stream = encode_frame(arr, bits)
    assert stream[:2] == b"\xff\xd8" and stream[-2:] == b"\xff\xd9"
    assert b"\xff\xc3" in stream  # SOF3: lossless, Huffman
    out = libjpeg.decode(stream)
    np.testing.assert_array_equal(out.reshape(arr.shape), arr)


@pytest.mark.parametrize(
    ("name", "signed"),
    [("random16_odd", False), ("random12", False), ("ct_like_128", True), ("random16_odd", True)],
)
def test_pydicom_decodes_exactly(name: str, signed: bool) -> None:
    arr, bits = FRAMES[name]
    if signed:  # same bits, reinterpreted as two's complement at this precision
        shift = 16 - bits
        arr = ((arr.astype(np.int32) << shift).astype(np.uint16).view(np.int16) >> shift).astype(np.int16)
    out = _dicom_roundtrip(arr, bits, signed)
    assert out.dtype == (np.int16 if signed else np.uint16)
    np.testing.assert_array_equal(out, arr)


def test_long_codes_are_limited_to_16_bits() -> None:
    """Fibonacci-like category counts force > 16-bit Huffman codes before Annex K.3 limiting."""
    fib = [1, 1]
    while len(fib) < 17:
        fib.append(fib[-1] + fib[-2])
    cats = np.repeat(np.arange(17), fib[::-1])
    bits, huffval = huffman_table(cats)
    assert bits.sum() == 17 == len(huffval)
    kraft = sum(int(n) * 2.0 ** -(i + 1) for i, n in enumerate(bits))
    assert kraft < 1.0  # no all-ones code
    # a one-row frame realising exactly these differences decodes back
    rng = np.random.default_rng(1)
    diffs = np.array([0, *[1 << (k - 1) for k in range(1, 16)], 32768])[rng.permutation(cats)]
    row = ((32768 + np.cumsum(diffs)) % 65536).astype(np.uint16)[None, :]
    out = libjpeg.decode(encode_frame(row, 16))
    np.testing.assert_array_equal(out.reshape(row.shape), row)


def test_pack_bits_msb_first_with_one_padding() -> None:
    assert pack_bits(np.array([0b101, 0b1]), np.array([3, 1])) == bytes([0b1011_1111])
    assert pack_bits(np.array([0xFFFFFFFF, 0]), np.array([32, 33 - 32])) == b"\xff\xff\xff\xff\x7f"


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_frame(np.zeros((2, 2, 2), dtype=np.uint16))
    with pytest.raises(ValueError):
        encode_frame(np.full((2, 2), 4096, dtype=np.uint16), precision=12)
    with pytest.raises(ValueError):
        encode_frame(np.zeros((2, 2), dtype=np.float32))


def test_512_slice_compresses() -> None:
    """A CT-like 512² frame compresses (its encoding speed: experiments/benchmarks/synthetic.py)."""
    arr = _ct_like(np.random.default_rng(2), (512, 512))
    stream = encode_frame(arr, 16)
    assert len(stream) < arr.nbytes  # it compresses
