"""``python -m cervspine.train experiment=NAME [overrides]``: fit one model, return the optimized metric
(for sweepers). The work is :func:`cervspine.training.fit.train`."""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

import cervspine.config  # noqa: F401  (registers resolvers)
from cervspine.training.fit import optimized_value, train

__all__ = ["main", "train"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    return optimized_value(cfg, metrics)


if __name__ == "__main__":
    main()
