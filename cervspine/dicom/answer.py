"""Answering complete series, one per step (the scorer loop, :mod:`.liveness`): the oldest complete series
is vetted (limits broken while it was received, one patient/study), its attempt counted, scored
(:mod:`.isolation`) and its job recorded — or it is refused, retried later, or quarantined, each with
its reason in the log, the queue and the status page. One bad series never stops the rest: an attempt
that fails or crashes counts against that series alone, and after ``attempts`` of them it is quarantined
(its instances moved to ``quarantine/<series>/`` with ``reason.json``) and the queue moves on.
"""

from __future__ import annotations

import logging
from typing import Any

from cervspine.dicom.isolation import ScoringError
from cervspine.dicom.queue import JobQueue
from cervspine.dicom.settings import ScoringSettings
from cervspine.dicom.spool import Spool
from cervspine.dicom.vetting import identity_problem

log = logging.getLogger(__name__)
KILLED = "the node stopped while scoring it (killed, or its worker crashed)"


class Answerer:
    """Takes the next complete series of ``queue`` and answers it with ``scoring`` (see :mod:`.answer`)."""

    def __init__(self, spool: Spool, queue: JobQueue, scoring, settings: ScoringSettings):
        self.spool, self.queue, self.scoring, self.settings = spool, queue, scoring, settings

    def step(self) -> bool:
        row = self.queue.next_complete()
        if row is None:
            return False
        try:
            self.answer(row)
        except BaseException as e:  # outside the scoring (content hash, disk, queue …): counted, retried
            series_uid, reason = row["series_uid"], self._clean(f"{type(e).__name__}: {e}")
            n = self.queue.count_failure(series_uid)
            if n >= self.settings.attempts:
                self.quarantine(series_uid, f"{n} attempts at it failed; the last: {reason}", n)
            else:
                self._retry(series_uid, reason, n)
            raise
        return True

    def answer(self, row: dict[str, Any]) -> None:
        series_uid = row["series_uid"]
        if row["poison"]:
            return self.quarantine(series_uid, row["poison"], int(row["attempts"] or 0))
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
        if row.get("purged_n") and n < int(row["purged_n"]):
            why = (f"{n} of the {row['purged_n']} instances it was answered with (the rest were purged "
                   "after retain_days): send the whole series again")  # fmt: skip
            log.warning("series %s refused: %s", series_uid, why)
            self.queue.set_series(series_uid, "failed", reason=why)
            self.queue.event("series refused", series_uid, why)
            return
        problem = identity_problem(self.spool.instances(series_uid))
        if problem is not None:
            return self.quarantine(series_uid, problem, 0)
        attempt = self.queue.start_attempt(series_uid, content_hash)
        if attempt > self.settings.attempts:
            last = row["reason"] if row["attempt_hash"] == content_hash and row["reason"] else KILLED
            why = f"{attempt - 1} attempts at scoring it failed or crashed; the last: {last}"
            return self.quarantine(series_uid, why, attempt - 1)
        earlier = [j["job"] for j in self.queue.jobs_of(series_uid)]
        log.info("series %s (%d instances): scoring (attempt %d)", series_uid, n, attempt)
        try:
            manifest = self.scoring.score(series_uid, content_hash, earlier)
        except ScoringError as e:
            return self._failed(series_uid, e, attempt)
        self.queue.add_job({**manifest, "last_arrival": row["last_arrival"]})
        log.info("series %s: job %s published (%.1f s)", series_uid, manifest["job"], manifest["seconds"])

    def _clean(self, reason: str) -> str:
        return reason.replace(str(self.spool.root), "<spool>")

    def _failed(self, series_uid: str, e: ScoringError, attempt: int) -> None:
        reason = self._clean(e.reason)
        if e.kind == "input":
            log.warning("series %s refused: %s", series_uid, reason)
            self.queue.set_series(series_uid, "failed", reason=reason)
            self.queue.event("series refused", series_uid, reason)
        elif e.kind == "node":  # not the series' fault: not counted against it
            self.queue.uncount_attempt(series_uid)
            self._retry(series_uid, f"not the series' fault, retried: {reason}", attempt, count=False)
        else:
            self._retry(series_uid, reason, attempt)

    def _retry(self, series_uid: str, reason: str, attempt: int, count: bool = True) -> None:
        reason = self._clean(reason)
        wait = self.settings.retry_wait(attempt)
        left = max(0, self.settings.attempts - attempt) if count else None
        log.warning(
            "series %s: scoring failed (attempt %d; again in %.0f s%s): %s", series_uid, attempt, wait,
            "" if left is None else f", {left} more before quarantine", reason,
        )  # fmt: skip
        self.queue.retry_later(series_uid, reason, wait)
        self.queue.event("scoring failed", series_uid, f"attempt {attempt}: {reason}")

    def quarantine(self, series_uid: str, reason: str, attempts: int) -> None:
        reason = self._clean(reason)
        folder = self.spool.quarantine(series_uid, reason, attempts)
        self.queue.set_series(series_uid, "quarantined", reason=reason)
        self.queue.event("series quarantined", series_uid, reason)
        log.error("series %s quarantined (%s): %s", series_uid, folder.relative_to(self.spool.root), reason)
