"""Predicting: a Kaggle ``submission.csv`` for a folder's test.csv, or one study folder's answer.

Every scored study also gets ``studies/<uid>.json`` (per-vertebra probabilities, the detected vertebra
extents, timings, the call at the run's operating point). The submission is written atomically and only
when every study was scored; otherwise the result lists the studies that could not be. ``report=true``
adds ``study_reports/<uid>/report.html`` (+ PNGs) per study (see :mod:`cervspine.report.study`); for one
study, ``dicom_out=OUT`` adds ``OUT/<uid>/`` with its DICOM SR, SEG and key images (:mod:`cervspine.dicom`;
``dicom_objects`` picks which).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from cervspine.cache import CachedStudy, CacheParams, InMemoryStudy, preprocess
from cervspine.inference import Predictor, StudyPrediction
from cervspine.io import load_study
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.io.rsna import RsnaIndex, is_synthetic
from cervspine.jobs.cache import cache_for
from cervspine.jobs.operating_point import resolve_thresholds
from cervspine.jobs.records import study_record, submission_frame  # noqa: F401  (re-exported)
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    not_localised: dict[str, list[str]] = field(default_factory=dict)  # levels answered by the prior
    submission: Path | None = None
    reports: dict[str, Path] = field(default_factory=dict)


def report_dir(cfg: DictConfig, uid: str) -> Path:
    """Where one study's report goes: ``<output_dir>/study_reports/<uid>/`` (``report.html`` and PNGs)."""
    return Path(cfg.paths.output_dir) / "study_reports" / uid


def make_predictor(cfg: DictConfig):
    """``cfg.predictor`` (run_dir / ckpt.*), or with ``bundle=B`` that bundle on ``backend``
    (onnxruntime by default, openvino, or torch: the checkpoints the bundle holds)."""
    if not cfg.get("bundle"):
        return instantiate(cfg.predictor)
    from cervspine.bundle.predictor import load_bundle_predictor

    p = cfg.predictor
    runtime = {"num_threads": p.get("num_threads"), "batch_size": p.get("batch_size")}
    backend = cfg.get("backend") or "onnxruntime"
    if backend == "torch":
        runtime.update(device=p.get("device", "auto"), channels_last=bool(p.get("channels_last")))
    return load_bundle_predictor(cfg.bundle, backend, p.get("precision", "auto"), **runtime)


def thresholds_for(cfg: DictConfig) -> OperatingThreshold | None:
    """:func:`resolve_thresholds`'s; with ``bundle=`` and no threshold given, the bundle's operating point."""
    if cfg.get("bundle") and cfg.get("report_threshold") is None and not cfg.get("operating_point"):
        from cervspine.bundle.predictor import bundle_thresholds

        return bundle_thresholds(cfg.bundle)
    return resolve_thresholds(cfg)[0]


def write_report(
    cfg: DictConfig, study: CachedStudy, pred: StudyPrediction, predictor: Predictor, synthetic: bool
) -> Path:
    """One scored study's report, at the operating point (:func:`resolve_thresholds`); its report.html."""
    return _study_report(cfg, study, pred, predictor, synthetic).html


def _study_report(
    cfg: DictConfig, study: CachedStudy, pred: StudyPrediction, predictor: Predictor, synthetic: bool
):
    from cervspine.report.study import write_study_report

    threshold = thresholds_for(cfg)
    out = report_dir(cfg, pred.uid)
    return write_study_report(out, study, pred, predictor, synthetic=synthetic, threshold=threshold)


def dicom_dir(cfg: DictConfig, uid: str) -> Path:
    """Where ``dicom_out=OUT`` puts one study's DICOM results: ``OUT/<uid>/`` (sr.dcm, seg.dcm, key_*.dcm)."""
    return Path(cfg.dicom_out) / uid


def dicom_objects(cfg: DictConfig) -> tuple[str, ...]:
    """The DICOM results ``dicom_out=`` writes (``dicom_objects``), checked before any work."""
    from cervspine.dicom.results import OBJECTS, check_objects

    if not cfg.get("dicom_out"):
        return ()
    asked = cfg.get("dicom_objects")
    return check_objects(list(OBJECTS if asked is None else asked))


def is_synthetic_study(cfg: DictConfig, predictor: Predictor) -> bool:
    """``synthetic`` when set, else: the folder sits in a generated RSNA folder (<root>/*_images/) or the
    models were trained on one."""
    from cervspine.dicom.algorithm import trained_on_synthetic

    if cfg.get("synthetic") is not None:
        return bool(cfg.synthetic)
    in_generated = any(is_synthetic(a) for a in Path(cfg.study).resolve().parents[:2])
    return in_generated or trained_on_synthetic(predictor) or bool(getattr(predictor, "synthetic", False))


def predict_study_folder(cfg: DictConfig, predictor: Predictor | None = None) -> StudyPrediction:
    """One DICOM folder (``cfg.study``), read and scored in memory (nothing is written to the cache);
    ``dicom_out`` adds its DICOM results (``dicom_objects`` of SR, SEG, key images; :mod:`cervspine.dicom`)
    and its report."""
    thresholds = thresholds_for(cfg)  # a named error before any work when a given one is missing
    objects = dicom_objects(cfg)
    predictor = predictor or make_predictor(cfg)
    source = load_study(cfg.study)
    study = InMemoryStudy(source, CacheParams(image_size=predictor.image_size))
    pred = predictor.predict(study)
    out = Path(cfg.paths.output_dir)
    write_json_atomic(out / "studies" / f"{pred.uid}.json", study_record(pred, thresholds))
    if cfg.get("report") or cfg.get("dicom_out"):
        synthetic = is_synthetic_study(cfg, predictor)
        report = _study_report(cfg, study, pred, predictor, synthetic)
    if cfg.get("dicom_out"):
        from cervspine.dicom.results import results_for_study

        out_dicom = dicom_dir(cfg, pred.uid)
        results_for_study(
            out_dicom, source, pred, report, predictor, thresholds, synthetic=synthetic, objects=objects
        )
    return pred


def predict_folder(cfg: DictConfig, predictor: Predictor | None = None) -> PredictResult:
    """Every study of ``data.root``'s test.csv; submission.csv only when all were scored."""
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude), require_images=False)
    if index.test is None or not len(index.test):
        raise FileNotFoundError(f"{cfg.data.root}: no test.csv rows to predict")
    predictor = predictor or make_predictor(cfg)
    out = Path(cfg.paths.output_dir)
    cache_dir, params = cache_for(cfg.data, predictor.image_size)
    synthetic = is_synthetic(cfg.data.root)
    thresholds = thresholds_for(cfg)
    result = PredictResult()
    uids = list(dict.fromkeys(index.test["StudyInstanceUID"]))
    for u in uids:
        if not index.study_dir(u).is_dir():
            result.failed[u] = f"no study folder {index.study_dir(u)}"
    built = preprocess(index, cache_dir, params, workers=cfg.workers, splits=("test",), progress=False)
    result.failed.update(built.failed)
    for uid in uids:
        if uid in result.failed:
            continue
        try:
            pred = predictor.predict(CachedStudy(cache_dir / uid))
        except Exception as e:  # keep scoring the others; report at the end
            result.failed[uid] = f"{type(e).__name__}: {e}"
            continue
        result.predictions[uid] = pred.probabilities
        result.not_localised[uid] = pred.not_localised
        write_json_atomic(out / "studies" / f"{uid}.json", study_record(pred, thresholds))
        if cfg.get("report"):
            study = CachedStudy(cache_dir / uid)
            try:  # a figure that fails must not cost the submission
                result.reports[uid] = write_report(cfg, study, pred, predictor, synthetic)
            except Exception:
                log.exception("%s: study report failed", uid)
    fallback = {u: r for u, r in result.not_localised.items() if r}
    if fallback:  # answered, but partly or wholly by the prior: say which (UIDs only, no patient data)
        log.warning("%d studies with levels stage 1 did not localise (answered by the prior):", len(fallback))
        for uid, levels in fallback.items():
            log.warning("  %s: %s", uid, ", ".join(levels))
    if result.reports:
        from cervspine.report.study import write_index

        write_index(out / "study_reports", result.reports, result.predictions, synthetic)
    if not result.failed:
        result.submission = out / "submission.csv"
        write_csv_atomic(submission_frame(index.test, result.predictions), result.submission)
    return result
