"""What a cache entry depends on besides its source files, and the fingerprint that decides whether an
entry is current."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cervspine import VERTEBRAE

CACHE_VERSION = 1
HU_MIN, HU_MAX = -1024, 3071
N_VERT = len(VERTEBRAE)


# Parameters added after caches existed: left out of key() at these values, so the fingerprints of entries
# built before them stay current (and read back with these values by key_differences).
_LATER_DEFAULTS: dict[str, Any] = {"max_error_hu": 0, "hu_floor": HU_MIN}


@dataclass(frozen=True)
class CacheParams:
    """What the cache content depends on besides the source files, and how the volumes are stored.

    ``compression`` (none | zstd | htj2k | jpegls, see :mod:`cervspine.cache.compressed`) is storage,
    not content: a lossless codec changes no voxel, so it is not part of :meth:`key` and an entry stored
    one way is current for a run that asks another (no rebuild of the full set because a later
    ``predict`` ran with the default). ``max_error_hu`` > 0 (near-lossless JPEG-LS, every voxel within
    that many HU) does change the content and is part of the key.

    ``hu_floor`` > -1024 stores every voxel below it as the floor: air (and lung) become one value, which
    the codecs store for almost nothing (the noise of air costs as much as the noise of tissue). Exact for
    the models' inputs as long as every HU window they use starts at or above the floor (bone starts at
    -500, soft at -160; the DataModules refuse a window below it); part of the key.
    """

    image_size: int | None = 256  # in-plane size after resizing; None keeps the original matrix
    segmentation_method: str = "auto"
    compression: str = "none"
    max_error_hu: int = 0
    hu_floor: int = HU_MIN

    def __post_init__(self) -> None:
        from cervspine.cache.compressed import check_codec

        check_codec(self.compression, self.max_error_hu)
        if not HU_MIN <= self.hu_floor < HU_MAX:
            raise ValueError(f"cache hu_floor must be in [{HU_MIN}, {HU_MAX}), got {self.hu_floor}")

    @classmethod
    def from_config(cls, data: Any, **override: Any) -> CacheParams:
        """The parameters a ``data`` config asks for (``image_size``, ``segmentation_method``,
        ``cache_compression``, ``cache_max_error_hu``, ``cache_hu_floor``); ``override`` wins (e.g. the
        checkpoints' size)."""
        get = data.get if hasattr(data, "get") else lambda k, d=None: getattr(data, k, d)
        floor = get("cache_hu_floor", None)
        values = {
            "image_size": get("image_size", 256),
            "segmentation_method": get("segmentation_method", "auto") or "auto",
            "compression": get("cache_compression", "none") or "none",
            "max_error_hu": int(get("cache_max_error_hu", 0) or 0),
            "hu_floor": HU_MIN if floor is None else int(floor),
        }
        values.update(override)
        if values["image_size"] is not None:
            values["image_size"] = int(values["image_size"])
        return cls(**values)

    def key(self) -> dict[str, Any]:
        """What an entry's content depends on (hashed into its fingerprint, kept in its meta.json)."""
        d = asdict(self)
        del d["compression"]
        for k, default in _LATER_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        return {**d, "version": CACHE_VERSION}


def check_windows_above_floor(windows: Any, hu_floor: int) -> None:
    """Refuse HU windows (low, high) that start below the cache's ``hu_floor``: their low part would see
    the floor where the scan had other values."""
    low = [w for w in windows if float(w[0]) < hu_floor]
    if low:
        raise ValueError(
            f"HU window(s) {', '.join(f'({w[0]:g}, {w[1]:g})' for w in low)} start below the cache's "
            f"data.cache_hu_floor={hu_floor}: choose windows that start at or above it, or a cache with a "
            "lower data.cache_hu_floor (-1024 stores every HU)"
        )


def key_differences(built: dict[str, Any], wanted: CacheParams) -> dict[str, tuple[Any, Any]]:
    """{name: (built, wanted)} of the content parameters in which an entry's recorded ``params`` differ
    from ``wanted`` (parameters added later read as their default where an older entry lacks them)."""
    want = {**_LATER_DEFAULTS, **wanted.key()}
    have = {**_LATER_DEFAULTS, **built}
    return {
        k: (have.get(k), want.get(k)) for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)
    }


def source_fingerprint(study_dir: Path, seg_path: Path | None, params: CacheParams) -> str:
    """A hash of the source files' names, sizes and mtimes plus the cache parameters."""
    h = hashlib.sha1(json.dumps(params.key(), sort_keys=True).encode())
    files = sorted(p for p in Path(study_dir).iterdir() if p.is_file())
    if seg_path is not None:
        files.append(Path(seg_path))
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_cache_dir(root: str | Path, image_size: int | None) -> Path:
    """Where a folder's cache of ``image_size`` lives unless ``data.cache_dir`` says otherwise."""
    return Path(root) / ".cervspine_cache" / f"s{image_size}"
