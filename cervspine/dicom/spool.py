"""The node's spool: every acknowledged instance on disk before the acknowledgement, and the folders of
the work that follows. Names are UIDs only (checked: a UID cannot escape its folder).

```
<spool>/queue.sqlite                      the persisted queue (:mod:`.queue`)
<spool>/incoming/<series>/<sop>.dcm        received instances, exactly the bytes the caller sent
<spool>/work/<job>/                        results being made (deleted at start-up: unfinished)
<spool>/outbox/<job>/                      results made, kept until the destination acknowledged them
<spool>/sent/<job>/                        results the destination acknowledged
<spool>/reports/<job>/report.html          the study page the status page links to
<spool>/studies/<study>/<series>.json      each answered series' record (probabilities, calls), as
                                           predict writes a study's (a study's series do not overwrite
                                           each other's; a series answered again replaces its own)
<spool>/dead_letter/<job>/                 results that will not be sent, with reason.json
<spool>/quarantine/<series>/               instances of a poison series, with reason.json
```
``<job>`` is ``<series UID>-<first 16 hex digits of the series' content hash>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import zlib
from pathlib import Path

from cervspine.dicom.files import fsync_dir, is_uid, write_bytes_atomic

MANIFEST = "manifest.json"
REASON = "reason.json"
FOLDERS = ("incoming", "work", "outbox", "sent", "reports", "studies", "dead_letter", "quarantine")


class SpoolMeter:
    """The spool's size in bytes: measured by walking it (:meth:`measure`, at start and by the scheduler),
    kept up to date in between by each stored instance (:meth:`add`)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.bytes = 0
        self.measure()

    def measure(self) -> int:
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    continue
        self.bytes = total
        return total

    def add(self, n: int) -> None:
        self.bytes += int(n)

    def free_bytes(self) -> int:
        return int(shutil.disk_usage(self.root).free)


class Spool:
    """The spool folders under ``root`` (created on first use); :meth:`lock` a series' lock (storing an
    instance and purging the series take it, so a purge can never delete an instance just acknowledged)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for sub in FOLDERS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(64)]  # striped: bounded, one per series at a time

    def lock(self, series_uid: str) -> threading.Lock:
        return self._locks[zlib.crc32(series_uid.encode()) % len(self._locks)]

    @property
    def db(self) -> Path:
        return self.root / "queue.sqlite"

    def sub(self, name: str) -> Path:
        return self.root / name

    def record_path(self, study_uid: str, series_uid: str) -> Path:
        """Where the record of a series' answer goes (one per series, in its study's folder)."""
        if not (is_uid(study_uid) and is_uid(series_uid)):
            raise ValueError(f"not a UID: {study_uid!r} / {series_uid!r}")
        return self.root / "studies" / study_uid / f"{series_uid}.json"

    def series_dir(self, series_uid: str) -> Path:
        if not is_uid(series_uid):
            raise ValueError(f"not a UID: {series_uid!r}")
        return self.root / "incoming" / series_uid

    def store(self, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance durably (temp file, fsync, rename, fsync of the folder)."""
        if not is_uid(sop_uid):
            raise ValueError(f"not a UID: {sop_uid!r}")
        folder = self.series_dir(series_uid)
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        return write_bytes_atomic(folder / f"{sop_uid}.dcm", data)

    def count(self, series_uid: str) -> int:
        """How many instances of the series are stored (without sorting their names)."""
        folder = self.series_dir(series_uid)
        try:
            return sum(
                1 for e in os.scandir(folder) if e.name.endswith(".dcm") and not e.name.startswith(".")
            )
        except FileNotFoundError:
            return 0

    def instances(self, series_uid: str) -> list[Path]:
        folder = self.series_dir(series_uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def content_hash(self, series_uid: str) -> tuple[str, int]:
        """(SHA-256 over the series' SOP Instance UIDs and file contents, number of instances): equal
        hashes mean the same instances, byte for byte."""
        h = hashlib.sha256()
        files = self.instances(series_uid)
        for f in files:
            h.update(f.stem.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest(), len(files)

    def latest_mtime(self, series_uid: str) -> float:
        files = self.instances(series_uid)
        return max((f.stat().st_mtime for f in files), default=0.0)

    def series_on_disk(self) -> list[str]:
        return sorted(p.name for p in (self.root / "incoming").iterdir() if p.is_dir() and is_uid(p.name))

    @staticmethod
    def job_name(series_uid: str, content_hash: str) -> str:
        return f"{series_uid}-{content_hash[:16]}"

    def publish(self, work: Path, job: str) -> Path:
        """Move a finished work folder into the outbox (one rename: the outbox holds whole results)."""
        target = self.root / "outbox" / job
        if target.exists():  # made before a crash that came between this rename and the queue's record
            shutil.rmtree(work, ignore_errors=True)
            return target
        os.replace(work, target)
        fsync_dir(target.parent)
        return target

    def mark_sent(self, job: str) -> Path:
        src, dst = self.root / "outbox" / job, self.root / "sent" / job
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
            fsync_dir(dst.parent)
        return dst

    def _set_aside(self, src: Path, dst: Path, reason: dict) -> Path:
        """Move ``src`` (if there) to ``dst`` (replacing an older one) and write ``reason.json`` in it."""
        if dst.exists():
            shutil.rmtree(dst, ignore_errors=True)
        if src.is_dir():
            os.replace(src, dst)
        dst.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(dst / REASON, json.dumps({**reason, "when": time.time()}, indent=2).encode())
        fsync_dir(dst.parent)
        return dst

    def dead_letter(self, job: str, reason: str, attempts: int = 0) -> Path:
        """The job's results out of the outbox into ``dead_letter/<job>/``, with why (not sent again)."""
        return self._set_aside(
            self.root / "outbox" / job,
            self.root / "dead_letter" / job,
            {"job": job, "reason": reason, "attempts": attempts},
        )

    def quarantine(self, series_uid: str, reason: str, attempts: int = 0) -> Path:
        """The series' instances out of ``incoming/`` into ``quarantine/<series>/``, with why; a series
        sent again starts from nothing (it needs its full set of instances)."""
        return self._set_aside(
            self.series_dir(series_uid),
            self.root / "quarantine" / series_uid,
            {"series_uid": series_uid, "reason": reason, "attempts": attempts},
        )

    def results(self, job: str) -> Path:
        """The job's result folder, wherever it is now (outbox, else sent)."""
        out = self.root / "outbox" / job
        return out if out.is_dir() else self.root / "sent" / job

    def clean_unfinished(self) -> list[str]:
        """Delete what a killed node left half-made: work folders and temporary instance files."""
        removed = []
        for p in (self.root / "work").iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
        for p in (self.root / "incoming").glob("*/.*.tmp*"):
            p.unlink(missing_ok=True)
            removed.append(p.name)
        return removed

    def purge_series(self, series_uid: str) -> None:
        """Delete the series' received instances (call with :meth:`lock` held)."""
        shutil.rmtree(self.series_dir(series_uid), ignore_errors=True)

    def purge_older(self, sub: str, before: float) -> int:
        """Delete the entries of ``<spool>/<sub>/`` last changed before ``before``; returns how many."""
        n = 0
        for p in (self.root / sub).iterdir():
            try:
                if p.lstat().st_mtime >= before:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            n += 1
        return n
