"""``python -m cervspine.serve run_dir=R spool=DIR port=P ae_title=AE
'allowed_callers=[{ae_title:PACS,address:IP}]' destination.host=H destination.port=P
destination.ae_title=AE idle_s=S http_port=P``: a DICOM node
beside a PACS (see :mod:`cervspine.dicom.node`). Runs until SIGTERM or Ctrl-C; a restart resumes."""

from __future__ import annotations

import functools
import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import cervspine.config  # noqa: F401  (registers resolvers)
from cervspine.dicom.node import serve
from cervspine.jobs.operating_point import resolve_thresholds
from cervspine.runs.layout import stage_checkpoints

__all__ = ["main", "serve"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    for noisy in ("pynetdicom", "highdicom"):  # their INFO lines are per PDU / per copied attribute
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = instantiate(cfg.node)
    stage_checkpoints(cfg.run_dir, cfg.ckpt.stage1, cfg.ckpt.stage2)  # named errors now, models load later
    thresholds, _ = resolve_thresholds(cfg)
    factory = functools.partial(instantiate, OmegaConf.to_container(cfg.predictor, resolve=True))  # pickles
    serve(settings, factory, thresholds)


if __name__ == "__main__":
    main()
