"""Scoring one complete series of the spool into a published job: the study read from its instances,
scored by the predictor (loaded once, on first use), its report, its study record and its DICOM results,
made in ``work/<job>/`` and moved into ``outbox/<job>/`` in one rename."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from cervspine.dicom.faults import crash_point, memory_point
from cervspine.dicom.spool import MANIFEST, Spool
from cervspine.io.atomic import write_json_atomic
from cervspine.jobs.records import study_record as predict_record
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)


def study_record(pred, thresholds: OperatingThreshold | None, series_uid: str) -> dict[str, Any]:
    """The record ``predict`` writes as ``studies/<uid>.json``, plus the series it answers (the node keeps
    one per series: ``studies/<study>/<series>.json``)."""
    return {**predict_record(pred, thresholds), "SeriesInstanceUID": series_uid}


class ModelsUnavailable(RuntimeError):
    """The models could not be loaded: no series is to blame (it is scored once they load)."""


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Scorer:
    """Makes the results of complete series; ``predictor_factory`` is called once, when first needed."""

    def __init__(
        self,
        spool: Spool,
        predictor_factory: Callable[[], Any],
        thresholds: OperatingThreshold | None,
        synthetic: bool | None,
    ):
        self.spool, self.factory, self.thresholds, self._synthetic = (
            spool,
            predictor_factory,
            thresholds,
            synthetic,
        )
        self._predictor = None
        self._loading = threading.Lock()
        self.node_pid: int | None = None  # the node's process, where this one is its worker

    @property
    def predictor(self):
        with self._loading:
            if self._predictor is None:
                t0 = time.perf_counter()
                try:
                    self._predictor = self.factory()
                except Exception as e:
                    raise ModelsUnavailable(f"loading the models failed ({type(e).__name__}: {e})") from e
                log.info("models loaded in %.1f s", time.perf_counter() - t0)
        return self._predictor

    def warm_up(self) -> threading.Thread:
        """Load the models in the background (the node listens meanwhile); a failure is logged here and
        raised again when a series needs them."""

        def load() -> None:
            try:
                _ = self.predictor
            except Exception:
                log.exception("loading the models failed")

        t = threading.Thread(target=load, name="cervspine-models", daemon=True)
        t.start()
        return t

    @property
    def synthetic_if_known(self) -> bool | None:
        """As :attr:`synthetic`, without loading the models (None: not known yet)."""
        return self.synthetic if self._synthetic is not None or self._predictor is not None else None

    @property
    def synthetic(self) -> bool:
        from cervspine.dicom.algorithm import trained_on_synthetic

        return bool(self._synthetic) if self._synthetic is not None else trained_on_synthetic(self.predictor)

    def previous_srs(self, earlier_jobs: list[str]) -> list:
        """The SRs of earlier answers to the same series (the new SR names them as predecessors)."""
        out = []
        for job in earlier_jobs:
            sr = self.spool.results(job) / "sr.dcm"
            if sr.is_file():
                out.append(pydicom.dcmread(sr, stop_before_pixels=True))
        return out

    def score(self, series_uid: str, content_hash: str, earlier_jobs: list[str] = ()) -> dict[str, Any]:
        """Score the series as its instances stand (``content_hash``) and publish the job; returns its
        manifest. Raises :class:`cervspine.io.CervspineInputError` for a series that cannot be read."""
        from cervspine.cache import CacheParams, InMemoryStudy
        from cervspine.dicom.results import results_for_study
        from cervspine.io import load_study
        from cervspine.report.study import write_study_report

        job = Spool.job_name(series_uid, content_hash)
        n_instances = len(self.spool.instances(series_uid))
        for done in (self.spool.sub("outbox") / job, self.spool.sub("sent") / job):
            manifest = read_manifest(done)
            if manifest is not None:  # published before a crash that the queue did not record
                return manifest
        work = self.spool.sub("work") / job
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        crash_point("decoding", series_uid)
        memory_point(series_uid)
        study = load_study(self.spool.series_dir(series_uid), workers=0)
        predictor = self.predictor
        cached = InMemoryStudy(study, CacheParams(image_size=predictor.image_size))
        crash_point("scoring", series_uid, node_pid=self.node_pid)
        pred = predictor.predict(cached)
        synthetic = self.synthetic
        report = write_study_report(
            self.spool.sub("reports") / job,
            cached,
            pred,
            predictor,
            synthetic=synthetic,
            threshold=self.thresholds,
        )
        previous = self.previous_srs(list(earlier_jobs))
        results = results_for_study(
            work, study, pred, report, predictor, self.thresholds, synthetic=synthetic, previous=previous
        )
        record = {**study_record(pred, self.thresholds, series_uid), "sr_uid": results.sr_uid, "job": job}
        calls = record["operating_point"].get("fracture_suspected") or {}
        manifest = {
            "job": job,
            "series_uid": series_uid,
            "study_uid": pred.uid,
            "content_hash": content_hash,
            "sr_uid": results.sr_uid,
            "files": [p.name for p in results.files],  # the SR last: sent = complete
            "n_files": len(results.files),
            "n_instances": n_instances,
            "patient_p": float(pred.probabilities[-1]),
            "suspected": calls.get("patient_overall"),
            "seconds": time.perf_counter() - t0,
            "record": record,
        }
        manifest["sha256"] = {name: _sha256(work / name) for name in manifest["files"]}  # checked at send
        write_json_atomic(work / MANIFEST, manifest)
        write_json_atomic(self.spool.record_path(pred.uid, series_uid), record)  # one per series
        self.spool.publish(work, job)
        crash_point("published")
        return manifest
