"""A small, strict reader for the few header fields :func:`load_study` needs from every slice.

pydicom builds a full Dataset per file (≈0.5 ms for a CT slice); this walks the element stream with
``struct`` and keeps only :data:`TAGS`, stopping at Pixel Data. It handles Part 10 files with a
preamble in implicit or explicit VR little endian (all the compressed syntaxes are explicit VR LE) and
raises :class:`Unsupported` on anything else (big endian, deflate, odd encodings, truncation) so that the
caller can fall back to pydicom, which stays the reference.
"""

from __future__ import annotations

import struct
from typing import Any, BinaryIO

UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = (0x7FE0, 0x0010)
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
IMPLICIT_LE = "1.2.840.10008.1.2"
BIG_OR_DEFLATED = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
US_TAGS = {
    (0x0028, 0x0002): "SamplesPerPixel",
    (0x0028, 0x0010): "Rows",
    (0x0028, 0x0011): "Columns",
    (0x0028, 0x0100): "BitsAllocated",
    (0x0028, 0x0101): "BitsStored",
    (0x0028, 0x0103): "PixelRepresentation",
}
TEXT_TAGS = {
    (0x0008, 0x0016): "SOPClassUID",
    (0x0008, 0x0060): "Modality",
    (0x0020, 0x000D): "StudyInstanceUID",
    (0x0020, 0x000E): "SeriesInstanceUID",
    (0x0020, 0x0013): "InstanceNumber",
    (0x0020, 0x0032): "ImagePositionPatient",
    (0x0020, 0x0037): "ImageOrientationPatient",
    (0x0028, 0x0008): "NumberOfFrames",
    (0x0028, 0x1052): "RescaleIntercept",
    (0x0028, 0x1053): "RescaleSlope",
}
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CHUNK = 1 << 14


class Unsupported(Exception):
    """Not a file this reader handles; use pydicom."""


class _Reader:
    """Sequential little-endian reads over a file, buffered in chunks, with cheap skips."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.buf = fh.read(_CHUNK)
        self.start = 0  # file offset of buf[0]
        self.pos = 0  # file offset of the next read

    def take(self, n: int) -> bytes:
        end = self.pos + n - self.start
        if self.pos < self.start or end > len(self.buf):
            self.fh.seek(self.pos)
            self.buf, self.start = self.fh.read(max(n, _CHUNK)), self.pos
            end = n
            if len(self.buf) < n:
                raise Unsupported("truncated header")
        data = self.buf[end - n : end]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        self.pos += n

    def tag(self) -> tuple[int, int]:
        return _TAG.unpack(self.take(4))  # type: ignore[return-value]

    def element(self, implicit: bool) -> tuple[bytes | None, int]:
        """VR (None when implicit) and value length of the element whose tag was just read."""
        if implicit:
            return None, _U32.unpack(self.take(4))[0]
        head = self.take(4)
        vr = head[:2]
        if vr in LONG_VRS:
            return vr, _U32.unpack(self.take(4))[0]
        if not vr.isalpha():
            raise Unsupported(f"bad VR {vr!r}")
        return vr, _U16.unpack(head[2:])[0]

    def skip_sequence(self, implicit: bool) -> None:
        """Skip an undefined-length sequence: items until the sequence delimiter."""
        while True:
            tag = self.tag()
            length = _U32.unpack(self.take(4))[0]
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise Unsupported(f"unexpected tag {tag} in a sequence")
            if length != UNDEFINED:
                self.skip(length)
                continue
            while (tag := self.tag()) != ITEM_END:
                vr, length = self.element(implicit)
                if length == UNDEFINED:
                    self.skip_sequence(implicit or vr == b"UN")
                else:
                    self.skip(length)
            self.skip(4)


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def _meta(reader: _Reader) -> str:
    """Walk group 0002 (always explicit VR LE); returns the transfer syntax UID."""
    syntax = ""
    while True:
        mark = reader.pos
        group, elem = reader.tag()
        if group != 0x0002:
            reader.pos = mark
            return syntax
        vr, length = reader.element(implicit=False)
        if length == UNDEFINED:
            raise Unsupported("undefined length in file meta")
        if elem == 0x0010:
            syntax = _text(reader.take(length))
        else:
            reader.skip(length)


def read_header(fh: BinaryIO) -> dict[str, Any]:
    """The fields of TEXT_TAGS / US_TAGS found before Pixel Data, plus TransferSyntaxUID,
    PixelDataOffset (file offset of the value) and PixelDataLength (-1 when encapsulated).

    Raises :class:`Unsupported` for anything this reader does not handle (the caller uses pydicom).
    """
    reader = _Reader(fh)
    if reader.take(132)[128:] != b"DICM":
        raise Unsupported("no DICM preamble")
    syntax = _meta(reader)
    if not syntax or syntax in BIG_OR_DEFLATED:
        raise Unsupported(f"transfer syntax {syntax!r}")
    implicit = syntax == IMPLICIT_LE
    out: dict[str, Any] = {"TransferSyntaxUID": syntax}
    while True:
        tag = reader.tag()
        vr, length = reader.element(implicit)
        if tag == PIXEL_DATA:
            out["PixelDataOffset"] = reader.pos
            out["PixelDataLength"] = -1 if length == UNDEFINED else length
            return out
        if tag[0] > PIXEL_DATA[0]:
            raise Unsupported("no pixel data")
        if length == UNDEFINED:
            reader.skip_sequence(implicit or vr == b"UN")
        elif tag in TEXT_TAGS:
            out[TEXT_TAGS[tag]] = _text(reader.take(length))
        elif tag in US_TAGS:
            if length != 2 or vr not in (None, b"US"):
                raise Unsupported(f"{US_TAGS[tag]} with VR {vr!r} and length {length}")
            out[US_TAGS[tag]] = _U16.unpack(reader.take(2))[0]
        else:
            reader.skip(length)
