"""What the node keeps, and for how long (``retain_days``): the received instances of answered, refused
and quarantined series, delivered results (``sent/``), reports, study records, dead letters, quarantined
instances and events are deleted once older than that; pending work (``outbox/``, series still being
received or scored) never is.

A series is purged under its lock (:meth:`cervspine.dicom.spool.Spool.lock`, which storing an instance
takes too) and only if it is still finished when the lock is held, so an instance acknowledged meanwhile
is never deleted. A purged series needs its full set again: a later re-send of fewer instances than it
was answered with is refused by name, not answered as if complete (:mod:`.answer`).
"""

from __future__ import annotations

import logging
import time

from cervspine.dicom.queue import JobQueue
from cervspine.dicom.spool import Spool

log = logging.getLogger(__name__)
FINISHED = ("answered", "failed", "quarantined")
AGED_FOLDERS = ("sent", "reports", "studies", "dead_letter", "quarantine")
KEEP_EVENTS = 10_000


class Retention:
    """Purges what is older than ``retain_days`` (None: keeps everything but events beyond the newest
    :data:`KEEP_EVENTS`), at most every ``every_s`` (:meth:`step`, from the scheduler)."""

    def __init__(self, spool: Spool, queue: JobQueue, retain_days: float | None, every_s: float = 600.0):
        self.spool, self.queue, self.retain_days, self.every_s = spool, queue, retain_days, float(every_s)
        self._last = 0.0

    def step(self, now: float | None = None, force: bool = False) -> dict[str, int] | None:
        now = time.time() if now is None else now
        if not force and now - self._last < self.every_s:
            return None
        self._last = now
        keep_s = None if self.retain_days is None else float(self.retain_days) * 86400
        done = {"events": self.queue.prune_events(keep=KEEP_EVENTS, older_than_s=keep_s)}
        if keep_s is None:
            return done
        before = now - keep_s
        old = [
            r["series_uid"]
            for st in FINISHED
            for r in self.queue.series(st)
            if float(r["updated"] or 0) < before
        ]
        done["series"] = sum(self.purge_series(uid, before) for uid in old)
        for sub in AGED_FOLDERS:
            done[sub] = self.spool.purge_older(sub, before)
        if any(done.values()):
            log.info("retention (%g days): purged %s", self.retain_days, done)
        return done

    def purge_series(self, series_uid: str, before: float) -> int:
        """Delete the series' instances if, under its lock, it is still finished and older than
        ``before``; 1 if it was purged."""
        with self.spool.lock(series_uid):
            row = self.queue.one_series(series_uid)
            if row is None or row["state"] not in FINISHED or float(row["updated"] or 0) >= before:
                return 0
            n = self.spool.count(series_uid)
            if not n:
                return 0
            self.spool.purge_series(series_uid)
            self.queue.mark_purged(series_uid, n)
            return 1
