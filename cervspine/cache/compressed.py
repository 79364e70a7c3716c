"""Per-slice compressed volumes: one file with an offset table, each slice decoded on its own.

The cache's ``volume.npy`` at 512² is ~0.5 MB a slice (~370 GB for the RSNA train set). A cache built
with ``compression=`` stores ``volume.cvol`` instead: every slice compressed on its own (losslessly by
default), so a reader decodes only the slices it asks for and :class:`CompressedVolume` stands in for the
memory-mapped array (``shape``, ``dtype``, numpy indexing along z with any in-plane index after it,
``np.asarray``). Codecs (all from ``imagecodecs``):

- ``zstd``    blosc2 with bit-shuffle + zstd: fast, ~2× on real CT
- ``htj2k``   High-Throughput JPEG 2000, reversible: ~4× on real CT, ~3 ms a 512² slice to decode
- ``jpegls``  JPEG-LS (CharLS): lossless like htj2k (slightly smaller, ~2× slower to decode), or
  near-lossless with ``max_error`` > 0 (every voxel within that many HU)

(measured on the real CT slices pydicom ships: ``experiments/rehearsal_codecs.md``).

File layout (little endian)::

    magic b"CSVOL\\x00\\x01\\n" · uint32 header length · header JSON (codec, dtype, shape, offset,
    max_error) · uint64 offsets[Z + 1] (from the file start) · uint32 crc32[Z] · the slices

Every slice carries the CRC-32 of its compressed bytes: a corrupt slice raises
:class:`CorruptCacheError` naming the file and the slice, never a silently wrong image. Files are
written to a temporary sibling and renamed into place, and each slice is decoded and compared with the
original before the file counts as written.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cervspine.io.errors import CervspineInputError

MAGIC = b"CSVOL\x00\x01\n"
CODECS = ("none", "zstd", "htj2k", "jpegls")
SUFFIX = ".cvol"


class CorruptCacheError(CervspineInputError):
    """A cache file fails its checks (truncated, bad checksum, undecodable slice)."""


def check_codec(codec: str, max_error: int = 0) -> None:
    if codec not in CODECS:
        raise ValueError(f"cache compression must be one of {', '.join(CODECS)}, got {codec!r}")
    if max_error < 0 or max_error and codec != "jpegls":
        raise ValueError(
            f"cache max_error_hu={max_error}: near-lossless storage is JPEG-LS only "
            "(data.cache_compression=jpegls) and the error must be >= 0"
        )


def _imagecodecs():
    try:
        import imagecodecs
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "compressed cache entries need the imagecodecs package (pip install imagecodecs)"
        ) from e
    return imagecodecs


def _encoder(codec: str, dtype: np.dtype, offset: int, max_error: int) -> Callable[[np.ndarray], bytes]:
    ic = _imagecodecs()
    if codec == "zstd":
        size = dtype.itemsize
        return lambda a: ic.blosc2_encode(
            np.ascontiguousarray(a),
            level=5,
            compressor="zstd",
            shuffle="bitshuffle",
            typesize=size,
            numthreads=1,
        )
    if codec == "htj2k":
        return lambda a: ic.htj2k_encode(np.ascontiguousarray(a), reversible=True)
    if codec == "jpegls":
        return lambda a: ic.jpegls_encode(_to_unsigned(a, offset), level=max_error)
    raise ValueError(f"no encoder for {codec!r}")


def _decoder(
    codec: str, dtype: np.dtype, shape: tuple[int, int], offset: int
) -> Callable[[bytes], np.ndarray]:
    ic = _imagecodecs()
    if codec == "zstd":
        return lambda b: np.frombuffer(ic.blosc2_decode(b, numthreads=1), dtype=dtype).reshape(shape)
    if codec == "htj2k":
        return lambda b: ic.htj2k_decode(b)
    if codec == "jpegls":
        return lambda b: _from_unsigned(ic.jpegls_decode(b), dtype, offset)
    raise ValueError(f"no decoder for {codec!r}")


def _to_unsigned(a: np.ndarray, offset: int) -> np.ndarray:
    """JPEG-LS codes unsigned samples: int16 HU + offset (≥ 0) as uint16; uint8 stays."""
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    return (a.astype(np.int32) + offset).astype(np.uint16)


def _from_unsigned(u: np.ndarray, dtype: np.dtype, offset: int) -> np.ndarray:
    if dtype == np.uint8:
        return u.astype(np.uint8, copy=False)
    out = u.view(np.int16) if u.dtype == np.uint16 else u.astype(np.int16)
    out -= np.int16(offset)  # values fit int16: the cache clips HU to [-1024, 3071]
    return out


def write_volume(
    path: Path, volume: np.ndarray, codec: str, *, max_error: int = 0, verify: bool = True
) -> dict[str, Any]:
    """Write ``volume`` (Z, H, W) int16 or uint8 slice by slice as ``codec``; atomic (temporary sibling,
    fsync, rename). ``verify`` decodes every slice and compares it with the original (exact, or within
    ``max_error``). Returns the header with ``stored_bytes``."""
    check_codec(codec, max_error)
    if codec == "none":
        raise ValueError("codec 'none' is stored as .npy, not .cvol")
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype not in (np.int16, np.uint8):
        raise ValueError(
            f"{path}: expected a (Z, H, W) int16 or uint8 volume, got {volume.dtype} {volume.shape}"
        )
    dtype = volume.dtype
    offset = 1024 if codec == "jpegls" and dtype == np.int16 else 0
    if offset and volume.size and int(volume.min()) < -offset:
        raise ValueError(f"{path}: jpegls stores int16 values >= {-offset}, got {int(volume.min())}")
    header = {
        "codec": codec,
        "dtype": dtype.str,
        "shape": list(volume.shape),
        "offset": offset,
        "max_error": int(max_error),
    }
    head = json.dumps(header).encode()
    z = volume.shape[0]
    table_at = len(MAGIC) + 4 + len(head)
    data_at = table_at + 8 * (z + 1) + 4 * z
    encode = _encoder(codec, dtype, offset, max_error)
    decode = _decoder(codec, dtype, volume.shape[1:], offset)
    offsets = np.zeros(z + 1, dtype="<u8")
    crcs = np.zeros(z, dtype="<u4")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(head)) + head)
            f.write(b"\0" * (data_at - table_at))
            pos = data_at
            for i in range(z):
                blob = bytes(encode(volume[i]))
                if verify:
                    _verify(path, i, decode(blob), volume[i], max_error)
                offsets[i] = pos
                crcs[i] = zlib.crc32(blob)
                f.write(blob)
                pos += len(blob)
            offsets[z] = pos
            f.seek(table_at)
            f.write(offsets.tobytes() + crcs.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {**header, "stored_bytes": int(offsets[z])}


def _verify(path: Path, i: int, got: np.ndarray, want: np.ndarray, max_error: int) -> None:
    if got.shape != want.shape:
        raise RuntimeError(f"{path}: slice {i} decodes to {got.shape}, not {want.shape}")
    err = int(np.abs(got.astype(np.int32) - want.astype(np.int32)).max()) if want.size else 0
    if err > max_error:
        raise RuntimeError(f"{path}: slice {i} decodes with an error of {err} (allowed {max_error})")


class CompressedVolume:
    """A ``.cvol`` file as a read-only (Z, H, W) array: indexing decodes only the slices it names.

    ``vol[z]``, ``vol[a:b]``, ``vol[[z0, z1, ...]]`` (any shape of integer array, repeats decoded once),
    ``vol[idx, y0:y1, x0:x1]`` and any other numpy index after the z part give what the same index of the
    uncompressed array gives; ``np.asarray(vol)`` decodes every slice. Results are new arrays.
    Picklable (the file is reopened in the worker that reads it).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(len(MAGIC) + 4)
            if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
                raise CorruptCacheError(f"{self.path}: not a compressed cache volume (bad magic)")
            (n,) = struct.unpack("<I", head[len(MAGIC) :])
            try:
                self.header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorruptCacheError(f"{self.path}: unreadable header ({e})") from None
            z = int(self.header["shape"][0])
            table = f.read(12 * z + 8)
        if len(table) != 12 * z + 8:
            raise CorruptCacheError(
                f"{self.path}: truncated offset table; delete the entry and run preprocess"
            )
        self.offsets = np.frombuffer(table[: 8 * (z + 1)], dtype="<u8").astype(np.int64)
        self.crcs = np.frombuffer(table[8 * (z + 1) :], dtype="<u4")
        size = self.path.stat().st_size
        if int(self.offsets[-1]) != size or np.any(np.diff(self.offsets) < 0):
            raise CorruptCacheError(
                f"{self.path}: {size} bytes where its offset table says {int(self.offsets[-1])} "
                "(truncated or overwritten); delete the entry and run preprocess"
            )
        self.shape: tuple[int, int, int] = tuple(int(s) for s in self.header["shape"])
        self.dtype = np.dtype(self.header["dtype"])
        self.codec: str = self.header["codec"]
        self._buf: np.memmap | None = None
        self._decode = None

    ndim = 3

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded array (what ``np.asarray`` returns)."""
        return self.size * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"CompressedVolume({str(self.path)!r}, {self.shape}, {self.dtype}, codec={self.codec})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buf"] = state["_decode"] = None
        return state

    def slice(self, z: int) -> np.ndarray:
        """Slice ``z`` (0 ≤ z < Z) decoded and checked against its CRC."""
        if self._buf is None:
            self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._decode = _decoder(self.codec, self.dtype, self.shape[1:], int(self.header["offset"]))
        blob = self._buf[self.offsets[z] : self.offsets[z + 1]]
        if zlib.crc32(blob) != int(self.crcs[z]):
            raise CorruptCacheError(
                f"{self.path}: slice {z} fails its checksum (corrupt file); "
                "delete the entry and run preprocess"
            )
        try:
            out = np.asarray(self._decode(blob.tobytes()))
        except Exception as e:
            raise CorruptCacheError(f"{self.path}: slice {z} cannot be decoded ({self.codec}): {e}") from None
        if out.shape != self.shape[1:]:
            raise CorruptCacheError(f"{self.path}: slice {z} decodes to {out.shape}, not {self.shape[1:]}")
        return out.astype(self.dtype, copy=False)

    def _stack(self, zs: np.ndarray) -> np.ndarray:
        out = np.empty((len(zs), *self.shape[1:]), dtype=self.dtype)
        for i, z in enumerate(zs):
            out[i] = self.slice(int(z))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._stack(np.arange(self.shape[0]))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if not key:
            return np.asarray(self)
        first, rest = key[0], key[1:]
        n = self.shape[0]
        if isinstance(first, (int, np.integer)):
            z = int(first) + n if first < 0 else int(first)
            if not 0 <= z < n:
                raise IndexError(f"index {int(first)} is out of bounds for axis 0 with size {n}")
            return self.slice(z)[None][(0, *rest)]
        if isinstance(first, slice):
            return self._stack(np.arange(n)[first])[(slice(None), *rest)]
        if first is Ellipsis or first is None:
            return np.asarray(self)[key]
        idx = np.asarray(first)
        if idx.dtype == bool:
            if idx.ndim != 1:
                return np.asarray(self)[key]
            if len(idx) != n:
                raise IndexError(f"boolean index of length {len(idx)} for axis 0 with size {n}")
            idx = np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"arrays used as indices must be of integer (or boolean) type, got {idx.dtype}")
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of bounds for axis 0 with size {n}")
        uniq, inv = np.unique(idx, return_inverse=True)
        return self._stack(uniq)[(inv.reshape(idx.shape), *rest)]
