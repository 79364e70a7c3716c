"""Delivering published jobs to the destination, one due job per step (the sender loop, :mod:`.liveness`).

A transient failure (unreachable, rejected, aborted, timed out, out of resources …) is retried after a
doubling wait capped at ``retry_max_s``; after ``send_attempts`` of them, or at once for a permanent one
(a damaged or missing result file, a 0xA9xx refusal, no presentation context), the job is dead-lettered:
its folder moves to ``dead_letter/<job>/`` with ``reason.json``, the queue marks it ``dead`` with the
reason, the log and the status page name it. Nothing else is lost: the jobs behind it go on.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from cervspine.dicom.queue import JobQueue
from cervspine.dicom.sender import PermanentSendError, SendError, store_files
from cervspine.dicom.settings import NodeSettings
from cervspine.dicom.spool import Spool
from cervspine.dicom.worker import read_manifest

log = logging.getLogger(__name__)


class Delivery:
    """Sends the oldest due job of the queue (:meth:`step`); ``ssl_context``: TLS to the destination."""

    def __init__(self, settings: NodeSettings, spool: Spool, queue: JobQueue, ssl_context=None):
        self.settings, self.spool, self.queue, self.ssl_context = settings, spool, queue, ssl_context

    def step(self) -> bool:
        due = self.queue.due_jobs()
        if not due:
            return False
        self.send(due[0])
        return True

    def files(self, job: dict[str, Any]) -> list:
        """The job's files in sending order, each checked against the manifest's SHA-256 if it has one."""
        folder = self.spool.results(job["job"])
        manifest = read_manifest(folder)
        if manifest is None:
            raise PermanentSendError(f"{folder.name}: results missing from the spool or manifest damaged")
        files = [folder / name for name in manifest["files"]]
        for path in files:
            if not path.is_file():
                raise PermanentSendError(f"{path.name}: missing from the job's results")
            want = (manifest.get("sha256") or {}).get(path.name)
            if want and hashlib.sha256(path.read_bytes()).hexdigest() != want:
                raise PermanentSendError(f"{path.name}: damaged in the spool (its SHA-256 changed)")
        return files

    def send(self, job: dict[str, Any]) -> None:
        name, attempt = job["job"], int(job["attempts"]) + 1
        dest = self.settings.destination
        try:
            store_files(
                dest, self.files(job), self.settings.ae_title, self.settings.timeouts, self.ssl_context
            )
        except PermanentSendError as e:
            return self.dead(job, f"permanent: {e}")
        except Exception as e:  # noqa: BLE001 — anything else is worth another try (SendError, OSError, …)
            error = f"{type(e).__name__}: {e}"
            if attempt >= int(self.settings.send_attempts):
                return self.dead(job, f"gave up after {attempt} transient failures; last: {error}")
            wait = self.settings.backoff(attempt)
            log.warning("job %s not delivered (attempt %d, next in %.0f s): %s", name, attempt, wait, error)
            self.queue.job_failed(name, error, wait)
            return
        self.queue.job_sent(name)
        self.spool.mark_sent(name)
        log.info("job %s delivered to %s", name, dest.ae_title)

    def dead(self, job: dict[str, Any], reason: str) -> None:
        name = job["job"]
        reason = reason.replace(str(self.spool.root), "<spool>")
        folder = self.spool.dead_letter(name, reason, attempts=int(job["attempts"]) + 1)
        self.queue.job_dead(name, reason)
        self.queue.event("job dead-lettered", name, reason)
        log.error("job %s dead-lettered (%s): %s", name, folder.relative_to(self.spool.root), reason)


__all__ = ["Delivery", "SendError"]
