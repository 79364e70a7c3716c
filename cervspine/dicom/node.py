"""The DICOM node: C-STORE in, results out, nothing lost, nothing dying silently.

Threads: pynetdicom's (one per association, :mod:`.scp`) write instances into the spool; three loops
(:mod:`.liveness`: each step guarded, errors logged and backed off, liveness reported) do the rest — the
*scheduler* promotes idle series to complete and purges old work, the *scorer* answers one complete series
at a time (:mod:`.answer`; decoding and scoring in a worker process, :mod:`.isolation`), the *sender*
C-STOREs published jobs to the destination (:mod:`.delivery`); the status page (:mod:`.status`) reads
the queue. State lives in the spool and its queue (:mod:`.queue`), so a node killed at any moment and
started again finishes every acknowledged study exactly once (:meth:`Node.recover`).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pydicom

from cervspine.dicom.answer import Answerer
from cervspine.dicom.delivery import Delivery
from cervspine.dicom.isolation import InProcessScoring, WorkerProcessScoring
from cervspine.dicom.liveness import Loop, health
from cervspine.dicom.queue import JobQueue
from cervspine.dicom.retention import Retention
from cervspine.dicom.scp import StoreSCP
from cervspine.dicom.settings import NodeSettings
from cervspine.dicom.spool import Spool
from cervspine.dicom.worker import Scorer, read_manifest
from cervspine.io.atomic import write_json_atomic
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)
ACTIVE_SERIES = ("receiving", "complete", "scoring")
ACTIVE_ROWS = 500  # rows of work in progress the status page lists (the counts say how many in all)
MEASURE_EVERY_S = 60.0  # the spool's size walked again (purges make it smaller)


class Node:
    """A running node (``start``/``stop``); :func:`serve` runs one until SIGTERM or SIGINT.
    ``predictor_factory`` is called once where the scoring runs (it must pickle when that is a worker
    process: ``settings.scoring.isolate``)."""

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
        sc = settings.scoring
        if sc.isolate:
            self.scoring = WorkerProcessScoring(
                self.spool, predictor_factory, thresholds, settings.synthetic,
                memory_mb=sc.memory_mb, timeout_s=sc.timeout_s,
            )  # fmt: skip
        else:
            self.scoring = InProcessScoring(
                Scorer(self.spool, predictor_factory, thresholds, settings.synthetic)
            )
        self.answerer = Answerer(self.spool, self.queue, self.scoring, sc)
        self.delivery = Delivery(settings, self.spool, self.queue, settings.tls.client_context())
        self.thresholds = thresholds
        self.status = None
        self._stop = threading.Event()
        self.loops: list[Loop] = []
        self.retention = Retention(self.spool, self.queue, settings.retain_days)
        self._last_measure = 0.0

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Node:
        summary = self.recover()
        log.info("recovered: %s", summary)
        self.scp.start()
        self.scoring.warm_up()
        s, stop = self.settings, self._stop
        self.loops = [
            Loop("scheduler", self._schedule, stop, idle_s=s.poll_s),
            Loop("scorer", self.answerer.step, stop, idle_s=s.poll_s, step_limit_s=s.scoring.timeout_s + 120),
            Loop("sender", self.delivery.step, stop, idle_s=s.poll_s, step_limit_s=1800),
        ]
        for loop in self.loops:
            loop.start()
        if s.http_port is not None:
            from cervspine.dicom.status import StatusServer

            self.status = StatusServer(
                s.http_port, self.snapshot, self.spool.sub("reports"), self.health,
                hosts=s.status_hosts, token=s.status_token,
            )  # fmt: skip
            self.status.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        for loop in self.loops:
            loop.join(timeout=60)
        self.scp.events.flush(force=True)
        self.scoring.close()
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
                if manifest is None and box == "outbox" and folder.is_dir():
                    why = "manifest missing or damaged at start-up: the results cannot be sent as made"
                    self.spool.dead_letter(folder.name, why)
                    self.queue.job_dead(folder.name, why)
                    log.error("job %s dead-lettered: %s", folder.name, why)
                    continue
                if manifest and self.queue.job_for(manifest["series_uid"], manifest["content_hash"]) is None:
                    same = self.spool.content_hash(manifest["series_uid"])[0] == manifest["content_hash"]
                    self.queue.recover_job(manifest, sent=sent, answered=same)
                    write_json_atomic(
                        self.spool.record_path(manifest["study_uid"], manifest["series_uid"]),
                        manifest["record"],
                    )
                    jobs += 1
        reopened = 0
        for series_uid in self.spool.series_on_disk():
            row, latest = self.queue.one_series(series_uid), self.spool.latest_mtime(series_uid)
            if latest and (row is None or latest > float(row["last_arrival"] or 0) + 1e-3):
                study = row["study_uid"] if row else self._study_of(series_uid)
                self.queue.received(series_uid, study, row["caller"] if row else "(recovered)", t=latest)
                reopened += 1
        self.queue.restart_idle_clocks()
        return {
            "removed_unfinished": len(removed),
            "reset_scoring": reset,
            "jobs": jobs,
            "reopened": reopened,
        }

    def _study_of(self, series_uid: str) -> str:
        for f in reversed(self.spool.instances(series_uid)):
            try:
                return str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
            except Exception:  # a damaged file: the next one
                continue
        return "(unknown)"

    # ------------------------------------------------------------------ the scheduler

    def _schedule(self) -> bool:
        promoted = self.queue.promote_idle(self.settings.idle_s, busy=self.scp.busy_series())
        self.scp.events.flush()
        if time.time() - self._last_measure > MEASURE_EVERY_S:
            self._last_measure = time.time()
            self.scp.meter.measure()
        self.retention.step()
        return promoted > 0

    # ------------------------------------------------------------------ views

    def snapshot(self, page: int = 0) -> dict[str, Any]:
        """What the status page shows (UIDs, AE titles and reasons only: no patient data): the work in
        progress (at most :data:`ACTIVE_ROWS` rows of each kind) and page ``page`` of the finished work
        (``status_page_size`` rows of each kind) — never the whole history at once."""
        s = self.settings
        t = self.thresholds
        size, q = int(s.status_page_size), self.queue
        at = dict(limit=size, offset=int(page) * size)
        series = [r for st in ACTIVE_SERIES for r in q.series(st, limit=ACTIVE_ROWS)]
        series += [r for st in ("failed", "quarantined") for r in q.series(st, **at)]
        jobs = q.jobs("sending", limit=ACTIVE_ROWS) + q.jobs("dead", **at) + q.jobs("sent", **at)
        counts = {**q.series_counts(), **q.job_counts(), "events": q.event_count()}
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
                "synthetic": self.scoring.synthetic_if_known,
            },
            "threads": self.threads(),
            "health": self.health(),
            "series": series,
            "jobs": jobs,
            "events": q.events(**at),
            "counts": counts,
            "page": int(page),
            "page_size": size,
            "largest": max([counts.get(k, 0) for k in ("failed", "quarantined", "dead", "sent", "events")]),
            "now": time.time(),
        }

    def threads(self) -> list[dict[str, Any]]:
        """Each loop's liveness, and the listener's (the thread that accepts connections)."""
        listener = self.scp.listener_thread
        alive = listener is not None and listener.is_alive()
        return [{"name": "listener", "alive": alive, "stalled": False}, *(loop.info() for loop in self.loops)]

    def health(self) -> dict[str, Any]:
        return health(self.threads(), stopping=self._stop.is_set())


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
