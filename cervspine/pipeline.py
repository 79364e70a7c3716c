"""``python -m cervspine.pipeline data.root=DIR experiment=NAME``: the whole job, resumable step by step
(see :mod:`cervspine.jobs.pipeline`). The run folder is stable (``outputs/pipeline/<experiment>``, or
``<experiment>_smoke`` with ``smoke=true``), so rerunning the command resumes; it ends with the model card,
the metrics, and the paths of the evaluation report and the submission. ``shard=i/N`` builds only that
part of the job's cache (the full set's preprocessing as N jobs: README, "The real data")."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

import cervspine.config  # noqa: F401  (registers resolvers)
from cervspine.jobs.pipeline import run_pipeline
from cervspine.report.console import print_metrics
from cervspine.report.model_card import write_model_card

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """The pipeline, then its model card and summary; returns metrics, submission and run folder."""
    result = run_pipeline(cfg)
    if "shard" in result:  # one preprocessing job of several (shard=i/N)
        built = result["preprocess"]
        print(f"cache shard {result['shard']}: {len(built.built)} built, {len(built.skipped)} current in "
              f"{result['cache_dir']}")  # fmt: skip
        return result
    run_dir = result["run_dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"model card: {write_model_card(cfg, run_dir, metrics)}")
    print_metrics(metrics)
    report = run_dir / "report" / "report.html"  # the evaluate step's (evaluate.report, default true)
    report = report if report.is_file() else None
    print(f"report:     {report or '(none: evaluate.report=false)'}")
    print(f"submission: {result['submission'] or '(no test.csv studies)'}")
    return {**result, "metrics": metrics, "report": report}


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except Exception as e:
        log.exception("pipeline failed")
        print(f"pipeline failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
