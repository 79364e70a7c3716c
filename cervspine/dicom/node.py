"""The DICOM node: C-STORE in, results out, nothing lost.

Threads: pynetdicom's (one per association, :mod:`.scp`) write instances into the spool; one worker
promotes idle series to complete and scores them one at a time (:mod:`.worker`, models loaded once, on
first need); one sender C-STOREs published jobs to the destination with retry and backoff
(:mod:`.sender`); the status page (:mod:`.status`) reads the queue. State lives in the spool and its
queue (:mod:`.queue`), so a node killed at any moment and started again finishes every acknowledged
study exactly once (:meth:`Node.recover`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pydicom

from cervspine.dicom.queue import JobQueue
from cervspine.dicom.scp import StoreSCP
from cervspine.dicom.sender import SendError, store_files
from cervspine.dicom.settings import NodeSettings
from cervspine.dicom.spool import Spool
from cervspine.dicom.vetting import identity_problem
from cervspine.dicom.worker import Scorer, read_manifest
from cervspine.io.atomic import write_json_atomic
from cervspine.io.errors import CervspineInputError
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)
PURGE_EVERY_S = 600.0


class Node:
    """A running node (``start``/``stop``); :func:`serve` runs one until SIGTERM or SIGINT."""

    def __init__(
        self,
        settings: NodeSettings,
        predictor_factory: Callable[[], Any],
        thresholds: OperatingThreshold | None = None,
    ):
        self.settings = settings
        self.spool = Spool(settings.spool)
        self.queue = JobQueue(self.spool.db)
        self.scp = StoreSCP(settings, self.spool, self.queue)
        self.scorer = Scorer(self.spool, predictor_factory, thresholds, settings.synthetic)
        self.thresholds = thresholds
        self.status = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_purge = 0.0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Node:
        summary = self.recover()
        log.info("recovered: %s", summary)
        self.scp.start()
        self.scorer.warm_up()
        for name, loop in (("worker", self._work_loop), ("sender", self._send_loop)):
            t = threading.Thread(target=loop, name=f"cervspine-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.settings.http_port is not None:
            from cervspine.dicom.status import StatusServer

            self.status = StatusServer(self.settings.http_port, self.snapshot, self.spool.sub("reports"))
            self.status.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        for t in self._threads:
            t.join(timeout=60)
        if self.status is not None:
            self.status.stop()
        self.queue.close()

    def recover(self) -> dict[str, int]:
        """Make the queue agree with the spool after any stop, SIGKILL included: unfinished work is
        deleted, series being scored go back to complete, published jobs the queue missed are recorded,
        and instances on disk that the queue missed reopen their series."""
        removed = self.spool.clean_unfinished()
        reset = self.queue.reset_interrupted()
        jobs = 0
        for box, sent in (("outbox", False), ("sent", True)):
            for folder in sorted(self.spool.sub(box).iterdir()):
                manifest = read_manifest(folder)
                if manifest and self.queue.job_for(manifest["series_uid"], manifest["content_hash"]) is None:
                    same = self.spool.content_hash(manifest["series_uid"])[0] == manifest["content_hash"]
                    self.queue.recover_job(manifest, sent=sent, answered=same)
                    write_json_atomic(
                        self.spool.sub("studies") / f"{manifest['study_uid']}.json", manifest["record"]
                    )
                    jobs += 1
        reopened = 0
        for series_uid in self.spool.series_on_disk():
            row, latest = self.queue.one_series(series_uid), self.spool.latest_mtime(series_uid)
            if latest and (row is None or latest > float(row["last_arrival"] or 0) + 1e-3):
                files = self.spool.instances(series_uid)
                study = str(pydicom.dcmread(files[-1], stop_before_pixels=True).StudyInstanceUID)
                self.queue.received(series_uid, study, row["caller"] if row else "(recovered)", t=latest)
                reopened += 1
        self.queue.restart_idle_clocks()
        return {
            "removed_unfinished": len(removed),
            "reset_scoring": reset,
            "jobs": jobs,
            "reopened": reopened,
        }

    # ------------------------------------------------------------------ the worker

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.queue.promote_idle(self.settings.idle_s, busy=self.scp.busy_series())
                row = self.queue.next_complete()
                if row is None:
                    self._purge_old()
                    self._stop.wait(self.settings.poll_s)
                    continue
                self._answer(row)
            except Exception:  # never let the worker die: the next series gets its chance
                log.exception("worker error")
                self._stop.wait(1.0)

    def _answer(self, row: dict[str, Any]) -> None:
        series_uid = row["series_uid"]
        content_hash, n = self.spool.content_hash(series_uid)
        done = self.queue.job_for(series_uid, content_hash)
        if done is not None:
            self.queue.set_series(series_uid, "answered", content_hash=content_hash)
            log.info(
                "series %s: the same %d instances as job %s, not answered again", series_uid, n, done["job"]
            )
            self.queue.event(
                "already answered", series_uid, f"{n} instances unchanged since job {done['job']}"
            )
            return
        problem = identity_problem(self.spool.instances(series_uid))
        if problem is not None:
            self._refuse(series_uid, problem)
            return
        earlier = [j["job"] for j in self.queue.jobs() if j["series_uid"] == series_uid]
        log.info("series %s (%d instances): scoring", series_uid, n)
        try:
            manifest = self.scorer.score(series_uid, content_hash, earlier)
        except CervspineInputError as e:
            self._refuse(series_uid, f"{type(e).__name__}: {e}")
            return
        except Exception as e:  # a model or report failure on this series: named, the node goes on
            log.exception("series %s: scoring failed", series_uid)
            self._refuse(series_uid, f"{type(e).__name__}: {e}")
            return
        self.queue.add_job({**manifest, "last_arrival": row["last_arrival"]})
        log.info("series %s: job %s published (%.1f s)", series_uid, manifest["job"], manifest["seconds"])

    def _refuse(self, series_uid: str, reason: str) -> None:
        reason = reason.replace(str(self.spool.root), "<spool>")
        log.warning("series %s refused: %s", series_uid, reason)
        self.queue.set_series(series_uid, "failed", reason=reason)
        self.queue.event("series refused", series_uid, reason)

    def _purge_old(self) -> None:
        days = self.settings.retain_days
        if days is None or time.time() - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = time.time()
        for row in self.queue.series("answered"):
            if time.time() - float(row["updated"] or 0) > float(days) * 86400:
                self.spool.purge_series(row["series_uid"])

    # ------------------------------------------------------------------ the sender

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            for job in self.queue.due_jobs():
                if self._stop.is_set():
                    break
                self._send(job)
            self._stop.wait(self.settings.poll_s)

    def _send(self, job: dict[str, Any]) -> None:
        folder = self.spool.results(job["job"])
        manifest = read_manifest(folder)
        try:
            if manifest is None:
                raise SendError(f"{folder.name}: results missing from the spool")
            files = [folder / name for name in manifest["files"]]
            store_files(self.settings.destination, files, self.settings.ae_title)
        except (SendError, OSError, RuntimeError, ValueError) as e:
            wait = self.settings.backoff(int(job["attempts"]) + 1)
            log.warning(
                "job %s not delivered (attempt %d, next in %.0f s): %s",
                job["job"],
                job["attempts"] + 1,
                wait,
                e,
            )
            self.queue.job_failed(job["job"], f"{type(e).__name__}: {e}", wait)
            return
        self.queue.job_sent(job["job"])
        self.spool.mark_sent(job["job"])
        log.info("job %s delivered to %s", job["job"], self.settings.destination.ae_title)

    # ------------------------------------------------------------------ views

    def snapshot(self) -> dict[str, Any]:
        """What the status page shows (UIDs, AE titles and reasons only: no patient data)."""
        s = self.settings
        t = self.thresholds
        return {
            "node": {
                "ae_title": s.ae_title,
                "port": self.scp.port,
                "allowed_callers": [str(c) for c in s.allowed_callers],
                "destination": f"{s.destination.ae_title}@{s.destination.host}:{s.destination.port}",
                "idle_s": s.idle_s,
                "operating_point": None
                if t is None
                else {"vertebra": t.vertebra, "patient": t.patient, "rule": t.rule},
                "synthetic": self.scorer.synthetic_if_known,
            },
            "series": self.queue.series(),
            "jobs": self.queue.jobs(),
            "events": self.queue.events(),
            "now": time.time(),
        }


def serve(
    settings: NodeSettings, predictor_factory: Callable[[], Any], thresholds: OperatingThreshold | None = None
) -> None:
    """Run a node until SIGTERM or SIGINT (``python -m cervspine.serve``)."""
    node = Node(settings, predictor_factory, thresholds).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(
        f"cervspine node {settings.ae_title} on port {node.scp.port}"
        + (f", status http://127.0.0.1:{settings.http_port}/" if settings.http_port is not None else ""),
        flush=True,
    )
    try:
        while not done.wait(1.0):
            pass
    finally:
        node.stop()
