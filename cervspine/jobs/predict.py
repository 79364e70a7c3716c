"""Predicting: a Kaggle ``submission.csv`` for a folder's test.csv, or one study folder's answer.

Every scored study also gets ``studies/<uid>.json`` (per-vertebra probabilities, the detected vertebra
extents, timings, the call at the run's operating point). The submission is written atomically with
every row of test.csv: a study that cannot be read or scored is answered with the training prior, logged
and listed in ``failures.csv`` (:mod:`cervspine.jobs.folder`; ``strict=true`` makes that an error).
``report=true`` adds ``study_reports/<uid>/report.html`` (+ PNGs) per study (:mod:`cervspine.report.study`);
for one study, ``dicom_out=OUT`` adds ``OUT/<uid>/`` with its DICOM SR, SEG and key images
(:mod:`cervspine.dicom`; ``dicom_objects`` picks which).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from cervspine.cache import CachedStudy, CacheParams, InMemoryStudy, preprocess
from cervspine.inference import Predictor, StudyPrediction
from cervspine.io import load_study
from cervspine.io.atomic import write_json_atomic
from cervspine.io.rsna import RsnaIndex, is_synthetic
from cervspine.jobs.cache import cache_for
from cervspine.jobs.folder import FolderResult, missing_folders, score_folder
from cervspine.jobs.operating_point import resolve_thresholds
from cervspine.jobs.records import study_record, submission_frame  # noqa: F401  (re-exported)
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)


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


def predict_folder(cfg: DictConfig, predictor: Predictor | None = None) -> FolderResult:
    """Every study of ``data.root``'s test.csv, from the cache (built for the ones missing), by the one
    folder loop (:func:`cervspine.jobs.folder.score_folder`): submission.csv with every row, a study that
    cannot be scored answered with the prior and listed in failures.csv (``strict=true``: an error)."""
    index = RsnaIndex.from_root(cfg.data.root, exclude=tuple(cfg.data.exclude), require_images=False)
    if index.test is None or not len(index.test):
        raise FileNotFoundError(f"{cfg.data.root}: no test.csv rows to predict")
    predictor = predictor or make_predictor(cfg)
    out = Path(cfg.paths.output_dir)
    cache_dir, params = cache_for(cfg.data, predictor.image_size)
    synthetic = is_synthetic(cfg.data.root)
    thresholds = thresholds_for(cfg)
    built = preprocess(index, cache_dir, params, workers=cfg.workers, splits=("test",), progress=False)
    failed = {**built.failed, **missing_folders(index)}  # "no study folder" says it plainest
    reports: dict[str, Path] = {}

    def report(uid: str, study: CachedStudy, pred: StudyPrediction) -> None:
        reports[uid] = write_report(cfg, study, pred, predictor, synthetic)

    result = score_folder(
        index.test,
        lambda uid: CachedStudy(cache_dir / uid),
        predictor.predict,
        predictor.prior,
        out,
        thresholds=thresholds,
        failed=failed,
        strict=bool(cfg.get("strict")),
        scored=report if cfg.get("report") else None,
    )
    if reports:
        from cervspine.report.study import write_index

        scored = {u: p for u, p in result.predictions.items() if u in reports}
        write_index(out / "study_reports", reports, scored, synthetic)
    return result
