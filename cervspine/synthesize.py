"""Write a synthetic RSNA-layout folder.

``python -m cervspine.synthesize out=DIR n_train=24 n_test=4 size=128 seed=0`` (see conf/synthesize.yaml).
A generator variant without the easy cues: ``... variant=hard`` (options given beside it win, e.g.
``variant=hard subaxial_shape=graded z_coverage=full 'fov_mm=[150,200]'``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cervspine.synthetic import write_rsna_folder

log = logging.getLogger(__name__)


def synthesize(cfg: DictConfig) -> dict[str, Any]:
    """Write the folder described by the config; returns the generator's summary."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(kwargs, dict)
    kwargs.pop("hydra", None)
    return write_rsna_folder(kwargs.pop("out"), **kwargs)


@hydra.main(version_base="1.3", config_path="../conf", config_name="synthesize")
def main(cfg: DictConfig) -> None:
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # it logs every tile it encodes
    summary = synthesize(cfg)
    log.info("synthetic RSNA folder written: %s", json.dumps(summary))


if __name__ == "__main__":
    main()
