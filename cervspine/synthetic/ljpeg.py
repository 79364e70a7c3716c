"""A small, vectorised lossless JPEG encoder (ITU T.81 process 14, first-order prediction).

Writes what DICOM calls *JPEG Lossless, Non-Hierarchical, First-Order Prediction* (transfer syntax
1.2.840.10008.1.2.4.70, "SV1"): one component, predictor 1 (left neighbour), point transform 0,
2–16 bit precision, an optimal Huffman table built from the difference histogram (Annex K.2/K.3).
pydicom cannot encode this syntax; :func:`encode_frame` fills that gap for the synthetic data
generator, and :func:`encapsulate_frames` wraps frames for ``PixelData``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
_N_CATEGORIES = 17  # SSSS = 0..16
_MAX_CODE_LENGTH = 16


def _marker(code: int, payload: bytes) -> bytes:
    """A marker segment: 0xFF, code, then a big-endian length that counts itself."""
    return bytes((0xFF, code)) + struct.pack(">H", len(payload) + 2) + payload


def predict_differences(pixels: np.ndarray, precision: int) -> np.ndarray:
    """Prediction residuals for predictor 1 as T.81 defines them, in [-32767, 32768].

    First pixel: 2**(P-1); first row: left neighbour; first column: the pixel above; else left.
    """
    x = pixels.astype(np.int32)
    diff = np.empty_like(x)
    np.subtract(x[:, 1:], x[:, :-1], out=diff[:, 1:])
    np.subtract(x[1:, 0], x[:-1, 0], out=diff[1:, 0])
    diff[0, 0] = x[0, 0] - (1 << (precision - 1))
    diff &= 0xFFFF  # differences are taken modulo 2**16
    diff[diff > 32768] -= 65536
    return diff.ravel()


_BIT_LENGTH = np.array([int(v).bit_length() for v in range(32769)], dtype=np.uint8)
_EXTRA_LENGTH = np.array([*range(16), 0], dtype=np.int64)  # category 16 has no extra bits
_EXTRA_MASK = ((1 << _EXTRA_LENGTH) - 1).astype(np.int32)


def difference_categories(diff: np.ndarray) -> np.ndarray:
    """SSSS: the bit length of |diff| (0 for 0, 16 for 32768)."""
    return _BIT_LENGTH[np.abs(diff)]


def _code_lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code sizes per symbol (Annex K.2), with a reserved all-ones code point."""
    freq = np.append(freq.astype(np.int64), 1)  # the reserved symbol keeps codes from being all ones
    n = freq.size
    size = np.zeros(n, dtype=np.int64)
    others = np.full(n, -1, dtype=np.int64)
    while True:
        live = np.flatnonzero(freq > 0)
        if live.size < 2:
            break
        # least frequency first; ties go to the largest symbol (as in K.2)
        order = live[np.lexsort((-live, freq[live]))]
        v1, v2 = int(order[0]), int(order[1])
        freq[v1] += freq[v2]
        freq[v2] = 0
        for v in (v1, v2):
            size[v] += 1
            while others[v] != -1:
                v = int(others[v])
                size[v] += 1
        v = v1
        while others[v] != -1:
            v = int(others[v])
        others[v] = v2
    return size


def _limit_bits(size: np.ndarray) -> np.ndarray:
    """BITS[1..16] from code sizes: Adjust_BITS (K.3) then drop the reserved code point."""
    bits = np.bincount(size[size > 0], minlength=40)[:40].astype(np.int64)
    i = bits.size - 1
    while i > _MAX_CODE_LENGTH:
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        i -= 1
    last = int(np.flatnonzero(bits[: _MAX_CODE_LENGTH + 1])[-1])
    bits[last] -= 1  # remove the reserved symbol's code
    return bits[1 : _MAX_CODE_LENGTH + 1]


def huffman_table(categories: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An optimal JPEG Huffman table for the categories: (BITS[16], HUFFVAL)."""
    freq = np.bincount(categories, minlength=_N_CATEGORIES)
    size = _code_lengths(freq)
    bits = _limit_bits(size)
    used = np.flatnonzero(freq)
    # symbols in order of code size, then value (K.2 Sort_input); sizes follow BITS after limiting
    huffval = used[np.lexsort((used, size[used]))]
    return bits, huffval


def _canonical_codes(bits: np.ndarray, huffval: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code and code length per category (Annex C), as lookup arrays indexed by SSSS."""
    sizes = np.repeat(np.arange(1, _MAX_CODE_LENGTH + 1), bits)
    codes = np.zeros(sizes.size, dtype=np.int64)
    code, prev = 0, int(sizes[0])
    for k, s in enumerate(sizes):
        code <<= int(s) - prev
        prev = int(s)
        codes[k] = code
        code += 1
    code_of = np.zeros(_N_CATEGORIES, dtype=np.uint64)
    size_of = np.zeros(_N_CATEGORIES, dtype=np.int64)
    code_of[huffval] = codes.astype(np.uint64)
    size_of[huffval] = sizes
    return code_of, size_of


def pack_bits(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate codes (MSB first, 1..32 bits each) into bytes, padding the last byte with ones."""
    values = np.asarray(values, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return b""
    if lengths.min() < 1 or lengths.max() > 32:
        raise ValueError("code lengths must be in 1..32")
    end_bit = np.cumsum(lengths)
    total = int(end_bit[-1])
    start = end_bit - lengths
    word, end = start >> 6, (start & 63) + lengths
    over = end - 64  # > 0: the code spills into the next word
    head = (values << np.maximum(-over, 0).view(np.uint64)) >> np.maximum(over, 0).view(np.uint64)
    words = np.zeros((total + 7 + 63) // 64, dtype=np.uint64)
    firsts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    words[word[firsts]] = np.bitwise_or.reduceat(head, firsts)
    spill = np.flatnonzero(over > 0)
    if spill.size:
        words[word[spill] + 1] |= values[spill] << (64 - over[spill]).view(np.uint64)
    pad = -total % 8
    if pad:
        words[total >> 6] |= np.uint64((1 << pad) - 1) << np.uint64(64 - (total & 63) - pad)
    return words.astype(">u8").tobytes()[: (total + pad) // 8]


def _stuff(data: bytes) -> bytes:
    """Insert 0x00 after every 0xFF in entropy-coded data."""
    arr = np.frombuffer(data, dtype=np.uint8)
    ff = np.flatnonzero(arr == 0xFF)
    if ff.size == 0:
        return data
    return np.insert(arr, ff + 1, 0).tobytes()


def _headers(rows: int, cols: int, precision: int, bits: np.ndarray, huffval: np.ndarray) -> bytes:
    sof3 = struct.pack(">BHHB", precision, rows, cols, 1) + bytes((1, 0x11, 0))
    dht = bytes((0x00,)) + bytes(int(b) for b in bits) + bytes(int(v) for v in huffval)
    sos = bytes((1, 1, 0x00, 1, 0, 0))  # Ns=1, Cs=1, Td/Ta=0, Ss=predictor 1, Se=0, Ah/Al=0
    return b"\xff\xd8" + _marker(0xC3, sof3) + _marker(0xC4, dht) + _marker(0xDA, sos)


def encode_frame(pixels: np.ndarray, precision: int = 16) -> bytes:
    """Encode one 2-D frame losslessly (SOF3, predictor 1, point transform 0).

    ``pixels`` holds the stored bit patterns: unsigned values < 2**precision. For signed DICOM data
    pass the two's-complement pattern, e.g. ``arr.view(np.uint16) & (2**bits_stored - 1)``.
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {pixels.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"precision must be in 2..16, got {precision}")
    if pixels.dtype.kind not in "ui" or (pixels.size and (pixels.min() < 0 or pixels.max() >> precision)):
        raise ValueError(f"pixels must be unsigned integers below 2**{precision}")
    rows, cols = pixels.shape
    if not (0 < rows < 65536 and 0 < cols < 65536):
        raise ValueError(f"bad frame size {pixels.shape}")
    diff = predict_differences(pixels, precision)
    ssss = difference_categories(diff)
    bits, huffval = huffman_table(ssss)
    code_of, size_of = _canonical_codes(bits, huffval)
    # extra bits: the low SSSS bits of diff (diff - 1 when negative); none for category 16
    extra = (diff - (diff < 0)) & _EXTRA_MASK[ssss]
    prefix = code_of << _EXTRA_LENGTH.astype(np.uint64)  # Huffman code shifted over its extra bits
    values = prefix[ssss] | extra.astype(np.uint64)
    data = pack_bits(values, (size_of + _EXTRA_LENGTH)[ssss])
    return _headers(rows, cols, precision, bits, huffval) + _stuff(data) + b"\xff\xd9"


def encapsulate_frames(frames: Sequence[bytes]) -> bytes:
    """Encapsulated ``PixelData`` (basic offset table + one fragment per frame)."""
    from pydicom.encaps import encapsulate

    return encapsulate(list(frames))
