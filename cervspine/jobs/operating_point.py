"""The run's operating point: chosen by ``evaluate`` on the validation fold and saved beside the models as
``<run_dir>/operating_point.json``; ``predict`` and the DICOM node use it unless told otherwise.

Config (``conf/evaluate.yaml``): ``operating_point.rule`` (``sensitivity`` | ``specificity`` | ``youden``),
``operating_point.target`` (0.9: the patient-level sensitivity to reach), ``operating_point.write_to_run``
(a stand-alone evaluate also writes the file into ``run_dir``; the pipeline's evaluate writes there anyway).
Predict-side (``conf/predict.yaml``): ``report_threshold`` (given thresholds) wins, then
``operating_point=PATH`` (another operating_point.json), then the run's file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cervspine.io.atomic import write_json_atomic
from cervspine.scoring.thresholds import (
    OperatingPoint,
    OperatingThreshold,
    calls_record,
    choose_operating_point,
    choose_thresholds,
)

__all__ = [
    "FILE_NAME",
    "calls_record",
    "choose_for_evaluation",
    "load_operating_point",
    "resolve_thresholds",
    "run_operating_point",
]

log = logging.getLogger(__name__)

FILE_NAME = "operating_point.json"


def _spec(cfg: DictConfig) -> dict[str, Any]:
    spec = cfg.get("operating_point") or {}
    return OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)


def choose_for_evaluation(
    cfg: DictConfig, y: np.ndarray, p: np.ndarray, out_dir: Path, synthetic: bool
) -> OperatingPoint:
    """Choose the operating point on the evaluated studies (``evaluate``'s labels and predictions) and
    write ``<out_dir>/operating_point.json`` (and ``<run_dir>/`` with ``operating_point.write_to_run``)."""
    spec = _spec(cfg)
    fold = cfg.get("fold")
    chosen_on = (
        f"validation fold {fold}"
        if fold is not None
        else "every labelled study, training studies included: optimistic"
    )
    provenance = {
        "chosen_on": chosen_on,
        "fold": fold,
        "data_root": str(cfg.data.root),
        "data": "synthetic" if synthetic else "real",
        "predictions": str(Path(out_dir) / "predictions.csv"),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bootstrap": "percentile, studies resampled, thresholds held fixed",
    }
    op = choose_operating_point(
        y,
        p,
        rule=str(spec.get("rule", "sensitivity")),
        target=spec.get("target", 0.9),
        n_boot=int(cfg.get("n_bootstrap", 1000)),
        provenance=provenance,
    )
    targets = [Path(out_dir) / FILE_NAME]
    run_dir = cfg.get("run_dir")
    if spec.get("write_to_run") and run_dir and Path(run_dir).resolve() != Path(out_dir).resolve():
        targets.append(Path(run_dir) / FILE_NAME)
    for path in targets:
        write_json_atomic(path, op.as_dict())
    return op


def load_operating_point(path: str | Path) -> OperatingPoint:
    """An operating_point.json (or the one in a run folder); a missing or malformed file is a named error."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no operating point: {path} does not exist (evaluate writes it)")
    try:
        return OperatingPoint.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an operating point file ({type(e).__name__}: {e})") from e


def run_operating_point(cfg: DictConfig) -> OperatingPoint | None:
    """The operating point ``predict``/``serve`` use: ``operating_point=PATH`` when given, else the run's
    ``<run_dir>/operating_point.json`` when it exists, else None."""
    given = cfg.get("operating_point")
    if given:
        return load_operating_point(given)
    run_dir = cfg.get("run_dir")
    if run_dir and (Path(run_dir) / FILE_NAME).is_file():
        return load_operating_point(run_dir)
    return None


def resolve_thresholds(cfg: DictConfig) -> tuple[OperatingThreshold | None, OperatingPoint | None]:
    """(thresholds to apply, the operating point they come from): ``report_threshold`` (given) wins, then
    :func:`run_operating_point`; (None, None) when there is neither."""
    given = cfg.get("report_threshold")
    if given is not None:
        given = OmegaConf.to_container(given) if isinstance(given, DictConfig) else given
        return choose_thresholds(None, None, given), None
    op = run_operating_point(cfg)
    return (op.thresholds(), op) if op is not None else (None, None)
