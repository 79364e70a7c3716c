"""Read access to cache entries (memory-mapped, or per-slice compressed), and the same interface for a
study held in memory."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cervspine.cache.compressed import SUFFIX, CompressedVolume
from cervspine.cache.entry import area_fractions, array_path, cached_volume, study_meta
from cervspine.cache.params import CacheParams


def _open_array(entry: Path, name: str) -> np.ndarray | CompressedVolume | None:
    path = array_path(entry, name)
    if path is None:
        return None
    return CompressedVolume(path) if path.suffix == SUFFIX else np.load(path, mmap_mode="r")


class CachedStudy:
    """Read access to one cache entry; slices load without the study.

    ``volume`` (and ``seg``) are the memory-mapped ``.npy`` of an uncompressed entry or a
    :class:`~cervspine.cache.compressed.CompressedVolume` of a compressed one: both index like an array
    (z first), so the DataModules and inference read either. Code that reads the whole volume more than
    once (a predictor's stages) takes :meth:`loaded` first.
    """

    def __init__(self, entry: Path):
        self.entry = Path(entry)
        meta_path = self.entry / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.entry}: not a complete cache entry (no meta.json); run preprocess"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())

    @property
    def uid(self) -> str:
        return self.meta["uid"]

    @property
    def num_slices(self) -> int:
        return int(self.meta["shape"][0])

    @cached_property
    def volume(self) -> np.ndarray | CompressedVolume:
        vol = _open_array(self.entry, "volume")
        if vol is None:
            raise FileNotFoundError(f"{self.entry}: no volume.npy or volume{SUFFIX}; run preprocess")
        return vol

    @cached_property
    def seg(self) -> np.ndarray | CompressedVolume | None:
        return _open_array(self.entry, "seg")

    @property
    def compressed(self) -> bool:
        return isinstance(self.volume, CompressedVolume)

    def loaded(self) -> CachedStudy:
        """This study with a compressed volume decoded once into memory (itself when nothing is to
        decode): for whole-volume readers such as a predictor, whose stages read the volume each."""
        if not self.compressed:
            return self
        study = object.__new__(type(self))
        study.__dict__.update(self.__dict__)
        study.__dict__["volume"] = np.asarray(self.volume)
        return study

    @cached_property
    def vertebra_area(self) -> np.ndarray | None:
        """(Z, 7) pixel counts of C1..C7 per slice, from the segmentation (None without one)."""
        v = self.meta.get("vertebra_area")
        return None if v is None else np.asarray(v, dtype=np.int64)

    def vertebra_presence(self, threshold: float, unit: str = "fraction") -> np.ndarray | None:
        """(Z, 7) float {0,1}: vertebra present where its area passes ``threshold`` (fraction or pixels)."""
        if self.vertebra_area is None:
            return None
        if unit == "fraction":
            return (area_fractions(self.vertebra_area) >= threshold).astype(np.float32)
        if unit == "pixels":
            return (self.vertebra_area >= threshold).astype(np.float32)
        raise ValueError(f"presence unit must be 'fraction' or 'pixels', got {unit!r}")

    @cached_property
    def spine_box(self) -> np.ndarray | None:
        v = self.meta.get("spine_box")
        return None if v is None else np.array(v, dtype=np.float32)

    def slices(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """HU int16 (len(indices), H, W); indices are clamped to the study (2.5D edges repeat)."""
        idx = np.clip(np.asarray(indices), 0, self.num_slices - 1)
        return np.asarray(self.volume[idx])


class InMemoryStudy(CachedStudy):
    """A study read straight from DICOM into the cache's form, without writing it (single-study use)."""

    def __init__(self, study, params: CacheParams, split: str = "test"):
        self.entry = Path(study.folder)
        vol = cached_volume(study, params)
        self.meta = study_meta(study, params, uid=study.uid, split=split, shape=vol.shape)
        self.__dict__["volume"] = vol
        self.__dict__["seg"] = None
