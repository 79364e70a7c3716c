"""The preprocessed study cache: one memory-mapped folder per study, its parameters, the builder."""

from cervspine.cache.builder import PreprocessReport, preprocess
from cervspine.cache.compressed import CompressedVolume, CorruptCacheError
from cervspine.cache.entry import build_entry, entry_is_current
from cervspine.cache.params import CacheParams, default_cache_dir, key_differences, source_fingerprint
from cervspine.cache.study import CachedStudy, InMemoryStudy

__all__ = [
    "CacheParams",
    "CachedStudy",
    "CompressedVolume",
    "CorruptCacheError",
    "InMemoryStudy",
    "PreprocessReport",
    "build_entry",
    "default_cache_dir",
    "entry_is_current",
    "key_differences",
    "preprocess",
    "source_fingerprint",
]
