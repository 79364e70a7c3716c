"""``python -m cervspine.preprocess data.root=DIR [workers=N] [shard=i/N]``: build the study cache,
parallel and resumable (see :mod:`cervspine.cache`). A pipeline job's cache is best built by the job itself
(``python -m cervspine.pipeline experiment=rsna shard=i/N``: the job's own cache settings)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cervspine.cache import CacheParams, PreprocessReport, preprocess
from cervspine.io.rsna import RsnaIndex
from cervspine.jobs.pipeline import shard_of

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> PreprocessReport:
    """Entry point body, called by tests and the pipeline."""
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude))
    params = CacheParams.from_config(cfg.data)
    report = preprocess(
        index,
        Path(cfg.data.cache_dir),
        params,
        workers=cfg.workers,
        shard=shard_of(cfg),
        progress=cfg.get("progress", True),
    )
    log.info(
        "preprocess: %d built, %d current, %d failed",
        len(report.built),
        len(report.skipped),
        len(report.failed),
    )
    for uid, why in report.failed.items():
        log.error("  %s: %s", uid, why)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    report = run(cfg)
    if not report.ok:
        print(f"{len(report.failed)} studies failed:", *report.failed, sep="\n  ", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
