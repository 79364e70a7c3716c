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


@dataclass(frozen=True)
class CacheParams:
    """What the cache content depends on besides the source files."""

    image_size: int | None = 256  # in-plane size after resizing; None keeps the original matrix
    segmentation_method: str = "auto"

    def key(self) -> dict[str, Any]:
        return {**asdict(self), "version": CACHE_VERSION}


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
