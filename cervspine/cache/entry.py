"""The preprocessed cache: one folder per study, built once, read by the DataModules.

Layout of ``<cache_dir>/<uid>/``:

- ``volume.npy``  int16 HU (Z, H, W), superior first, in-plane resized to ``image_size`` (memory-mappable)
- ``seg.npy``     uint8 labels (Z, H, W) aligned with the volume (only when a segmentation exists)
- ``meta.json``   geometry, DICOM metadata, per-slice vertebra fractions and spine boxes, the fingerprint,
  how the arrays are stored (``storage``)

With ``compression`` other than none the arrays are ``volume.cvol`` / ``seg.cvol`` instead: each slice
compressed on its own (the volume with that codec, the labels with zstd), see
:mod:`cervspine.cache.compressed`; :class:`~cervspine.cache.study.CachedStudy` reads either form.

An entry is written into a temporary sibling folder and renamed into place, so a reader never sees a
half-written entry; ``meta.json`` is written last and its fingerprint (source files + parameters + cache
version) decides whether an existing entry is current.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cervspine.cache.compressed import SUFFIX, write_volume
from cervspine.cache.params import HU_MAX, HU_MIN, N_VERT, CacheParams, source_fingerprint

ARRAY_NAMES = ("volume", "seg")


def resize_stack(stack: np.ndarray, size: int | None, *, nearest: bool = False) -> np.ndarray:
    """Resize (Z, H, W) in-plane to (Z, size, size); area interpolation, nearest for label maps."""
    if size is None or stack.shape[1:] == (size, size):
        return stack
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    out = np.empty((stack.shape[0], size, size), dtype=stack.dtype)
    for z in range(stack.shape[0]):
        sl = stack[z] if nearest else stack[z].astype(np.float32)
        r = cv2.resize(sl, (size, size), interpolation=interp)
        out[z] = np.rint(r).astype(stack.dtype) if not nearest else r
    return out


def vertebra_areas(seg: np.ndarray) -> np.ndarray:
    """(Z, 7) pixel count of C1..C7 on each slice (at the segmentation's own resolution)."""
    counts = np.zeros((seg.shape[0], N_VERT), dtype=np.int64)
    for z in range(seg.shape[0]):
        counts[z] = np.bincount(seg[z].ravel(), minlength=N_VERT + 1)[1 : N_VERT + 1]
    return counts


def area_fractions(areas: np.ndarray) -> np.ndarray:
    """Areas → fraction of each vertebra's largest cross-section (0 where the vertebra never shows)."""
    areas = np.asarray(areas, dtype=np.float64)
    peak = areas.max(axis=0, keepdims=True)
    return np.divide(areas, peak, out=np.zeros_like(areas), where=peak > 0).astype(np.float32)


def spine_boxes(seg: np.ndarray, chunk: int = 32) -> np.ndarray:
    """(Z, 4) normalised (y0, x0, y1, x1) box of the cervical labels 1..7 per slice; NaN where absent.

    Computed ``chunk`` slices at a time: the boolean masks never cover the whole segmentation (at
    512² they were the peak of a study's preprocessing); the same boxes as
    :func:`_spine_boxes_reference`.
    """
    z, h, w = seg.shape
    boxes = np.full((z, 4), np.nan, dtype=np.float32)
    for start in range(0, z, chunk):
        part = seg[start : start + chunk]
        cerv = (part >= 1) & (part <= N_VERT)
        rows, cols = cerv.any(axis=2), cerv.any(axis=1)
        for i in np.flatnonzero(rows.any(axis=1)):
            ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
            boxes[start + i] = (ys[0] / h, xs[0] / w, (ys[-1] + 1) / h, (xs[-1] + 1) / w)
    return boxes


def _spine_boxes_reference(seg: np.ndarray) -> np.ndarray:
    """The whole-volume form of :func:`spine_boxes` (tests and the memory benchmark compare)."""
    z, h, w = seg.shape
    boxes = np.full((z, 4), np.nan, dtype=np.float32)
    cerv = (seg >= 1) & (seg <= N_VERT)
    rows, cols = cerv.any(axis=2), cerv.any(axis=1)
    for i in np.flatnonzero(rows.any(axis=1)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        boxes[i] = (ys[0] / h, xs[0] / w, (ys[-1] + 1) / h, (xs[-1] + 1) / w)
    return boxes


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr))
        f.flush()
        os.fsync(f.fileno())


def save_array(folder: Path, name: str, arr: np.ndarray, params: CacheParams) -> dict[str, Any]:
    """``<name>.npy`` (compression none) or ``<name>.cvol``; returns how it was stored (for meta.json)."""
    if params.compression == "none":
        _save_npy(folder / f"{name}.npy", arr)
        return {"file": f"{name}.npy", "codec": "none", "stored_bytes": int(arr.nbytes)}
    codec, max_error = (params.compression, params.max_error_hu) if name == "volume" else ("zstd", 0)
    head = write_volume(folder / f"{name}{SUFFIX}", arr, codec, max_error=max_error)
    return {
        "file": f"{name}{SUFFIX}",
        "codec": codec,
        "max_error": max_error,
        "stored_bytes": head["stored_bytes"],
    }


def array_path(entry: Path, name: str) -> Path | None:
    """The stored file of array ``name`` (volume, seg) of an entry, either form; None if absent."""
    for p in (entry / f"{name}.npy", entry / f"{name}{SUFFIX}"):
        if p.is_file():
            return p
    return None


def cached_volume(study, params: CacheParams) -> np.ndarray:
    """The cache's form of a study volume: int16 HU clipped to [-1024, 3071], resized in-plane.

    When resizing, each slice is clipped on its own (the same values as clipping the whole volume
    first, see :func:`_cached_volume_reference`) so that no clipped copy of the full-resolution
    volume is ever held: a study costs its volume plus the small resized result.
    """
    volume, size = study.volume, params.image_size
    if size is None or volume.shape[1:] == (size, size):
        return _floor(np.clip(volume, HU_MIN, HU_MAX).astype(np.int16, copy=False), params)
    out = np.empty((volume.shape[0], size, size), dtype=np.int16)
    hu = np.empty(volume.shape[1:], dtype=np.int16)
    for z in range(volume.shape[0]):
        np.clip(volume[z], HU_MIN, HU_MAX, out=hu, casting="unsafe")  # float HU truncate like astype
        r = cv2.resize(hu.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
        out[z] = np.rint(r)
    return _floor(out, params)


def _floor(volume: np.ndarray, params: CacheParams) -> np.ndarray:
    """``params.hu_floor`` applied after resizing (so the resized pixels are those of the unfloored
    volume, and any window starting at or above the floor sees exactly what it would without it)."""
    if params.hu_floor <= HU_MIN:
        return volume
    return np.maximum(volume, np.int16(params.hu_floor))


def _cached_volume_reference(study, params: CacheParams) -> np.ndarray:
    """The straightforward form of :func:`cached_volume` (whole-volume clip, then resize): tests and
    the memory benchmark compare both."""
    volume = np.clip(study.volume, HU_MIN, HU_MAX).astype(np.int16, copy=False)
    return _floor(resize_stack(volume, params.image_size), params)


def study_meta(study, params: CacheParams, *, uid: str, split: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """The geometry and metadata part of an entry's meta.json (also used for in-memory studies)."""
    z, h, w = study.volume.shape
    return {
        "uid": uid,
        "split": split,
        "source": str(study.folder),
        "original_shape": [z, h, w],
        "shape": list(shape),
        "spacing": list(study.spacing),
        "spacing_cached": [
            study.spacing[0],
            study.spacing[1] * h / shape[1],
            study.spacing[2] * w / shape[2],
        ],
        "z_positions": np.asarray(study.z_positions).tolist(),
        "instance_numbers": np.asarray(study.instance_numbers).astype(int).tolist(),
        "stored_reversed": bool(study.stored_reversed),
        "metadata": _jsonable(study.metadata),
        "params": params.key(),
        "has_segmentation": False,
    }


def build_entry(
    uid: str,
    study_dir: Path,
    seg_path: Path | None,
    cache_dir: Path,
    params: CacheParams,
    split: str,
) -> Path:
    """Read one study (and its segmentation) and write its cache entry atomically."""
    from cervspine.io import load_segmentation, load_study

    cache_dir = Path(cache_dir)
    fingerprint = source_fingerprint(study_dir, seg_path, params)
    study = load_study(study_dir)
    tmp = cache_dir / f".tmp-{uid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        volume = cached_volume(study, params)
        meta = study_meta(study, params, uid=uid, split=split, shape=volume.shape)
        meta["fingerprint"] = fingerprint
        meta["storage"] = {"volume": save_array(tmp, "volume", volume, params)}
        del volume
        if seg_path is not None:
            seg = load_segmentation(seg_path, study, method=params.segmentation_method)
            meta["has_segmentation"] = True
            meta["vertebra_area"] = vertebra_areas(seg).tolist()
            meta["spine_box"] = _nan_to_none(spine_boxes(seg))
            seg = resize_stack(seg, params.image_size, nearest=True)
            meta["storage"]["seg"] = save_array(tmp, "seg", seg, params)
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        final = cache_dir / uid
        if final.exists():
            stale = cache_dir / f".stale-{uid}-{os.getpid()}"
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir / uid


def _nan_to_none(a: np.ndarray) -> list:
    return [[None if np.isnan(v) else round(float(v), 5) for v in row] for row in a]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, (list, tuple)):
            v = [x.item() if isinstance(x, np.generic) else str(x) if isinstance(x, Path) else x for x in v]
        elif isinstance(v, Path) or v is not None and not isinstance(v, (str, int, float, bool)):
            v = str(v)
        out[k] = v
    return out


def entry_is_current(entry: Path, fingerprint: str) -> bool:
    """True when a complete entry with this fingerprint exists."""
    meta = entry / "meta.json"
    if not (meta.is_file() and array_path(entry, "volume") is not None):
        return False
    try:
        return json.loads(meta.read_text()).get("fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False
