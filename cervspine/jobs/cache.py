"""The cache a job scores from: the one at the image size the checkpoints were trained on."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from cervspine.cache import CacheParams, default_cache_dir

log = logging.getLogger(__name__)


def cache_for(data: DictConfig, image_size: int | None) -> tuple[Path, CacheParams]:
    """(cache folder, parameters) for models trained on caches of ``image_size`` (None: the config's).

    Scoring a cache of another size feeds the models other pixels than they learned on, so the
    checkpoints' size wins over ``data.image_size``: the default cache folder follows it (logged); a
    ``data.cache_dir`` given explicitly stays, and its entries are (re)built at that size (a warning).
    """
    configured = int(data.image_size) if data.image_size is not None else None
    size = configured if image_size is None else int(image_size)
    params = CacheParams.from_config(data, image_size=size)
    cache_dir = Path(data.cache_dir)
    if size == configured:
        return cache_dir, params
    if cache_dir == default_cache_dir(data.root, configured):
        cache_dir = default_cache_dir(data.root, size)
        log.info("data.image_size %s → %s (the checkpoints' size): cache %s", configured, size, cache_dir)
    else:
        log.warning(
            "data.cache_dir=%s given with data.image_size=%s: its entries are built at %s, the size the "
            "checkpoints were trained on",
            cache_dir,
            configured,
            size,
        )
    return cache_dir, params
