"""``python -m cervspine.viewer study=DIR results=OUT/<uid>``: a study and its DICOM results in the OHIF
Viewer on localhost, over a private Orthanc (:mod:`cervspine.dicom.ohif`). Runs until Ctrl-C."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import pydicom
from omegaconf import DictConfig

import cervspine.config  # noqa: F401  (registers resolvers)
from cervspine.dicom.ohif import OhifServer, fetch_ohif
from cervspine.dicom.orthanc import LocalOrthanc

__all__ = ["main", "upload_study"]


def upload_study(pacs: LocalOrthanc, study: str | Path, results: str | Path | None) -> str:
    """Store the study's ``*.dcm`` files and those of ``results`` in ``pacs``; its Study Instance UID."""
    files = sorted(Path(study).glob("*.dcm")) + (sorted(Path(results).glob("*.dcm")) if results else [])
    if not files:
        raise FileNotFoundError(f"{study}: no .dcm files")
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files}
    if len(uids) != 1:
        raise ValueError(f"{study}, {results}: files of {len(uids)} studies; give one study and its results")
    for path in files:
        pacs.upload(path.read_bytes())
    return uids.pop()


@hydra.main(version_base="1.3", config_path="../conf", config_name="viewer")
def main(cfg: DictConfig) -> None:
    dist = fetch_ohif(cfg.ohif_cache)
    out = Path(cfg.paths.output_dir)
    with LocalOrthanc(out / "orthanc", dicomweb=True) as pacs, OhifServer(dist, pacs.url, cfg.port) as viewer:
        uid = upload_study(pacs, cfg.study, cfg.results)
        print(f"open {viewer.study_url(uid)}   (Ctrl-C stops the viewer and its Orthanc)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
