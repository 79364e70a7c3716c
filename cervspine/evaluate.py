"""``python -m cervspine.evaluate data.root=DIR run_dir=RUN [fold=k | fold=null]``: score a validation fold
(or every labelled study) with the full inference path; see :mod:`cervspine.jobs.evaluate`."""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import cervspine.config  # noqa: F401  (registers resolvers)
from cervspine.jobs.evaluate import evaluate
from cervspine.report.console import print_metrics

__all__ = ["evaluate", "main"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    metrics = evaluate(cfg, instantiate(cfg.predictor))
    if "report" in metrics:
        print(f"report: {metrics['report']}")
    print_metrics(metrics)


if __name__ == "__main__":
    main()
