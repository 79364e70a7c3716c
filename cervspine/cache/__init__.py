"""The preprocessed study cache: one memory-mapped folder per study, its parameters, the builder."""

from cervspine.cache.builder import PreprocessReport, preprocess
from cervspine.cache.entry import build_entry, entry_is_current
from cervspine.cache.params import CacheParams, default_cache_dir, source_fingerprint
from cervspine.cache.study import CachedStudy, InMemoryStudy

__all__ = [
    "CacheParams",
    "CachedStudy",
    "InMemoryStudy",
    "PreprocessReport",
    "build_entry",
    "default_cache_dir",
    "entry_is_current",
    "preprocess",
    "source_fingerprint",
]
