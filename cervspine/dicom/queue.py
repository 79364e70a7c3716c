"""The node's persisted queue: a small SQLite database (WAL, synchronous=FULL) in the spool.

``series``: each received series and where it stands —
``receiving`` → (no instance for ``idle_s``) ``complete`` → ``scoring`` → ``answered``; or ``failed``
(it cannot be read: the reason), or ``quarantined`` (poison: over a limit, mixed identity, or ``attempts``
scoring attempts that crashed or failed). ``attempts`` counts the attempts on the series' current
instances, written *before* each attempt, so an attempt that kills the node counts too. ``jobs``: each
set of results (one per series *and content hash*) — ``sending`` until the destination acknowledged every
object, then ``sent``; ``dead`` when it was dead-lettered (the reason in ``last_error``). A job per
(series, content) is what makes a study sent twice answered once: the same instances give the same
hash, and that job exists already. ``events``: refusals and other things the status page lists (no
patient data: UIDs, AE titles, addresses), repeats of one refusal folded into its ``count``, pruned.

Every transition is one transaction, so a node killed at any moment restarts from a consistent queue;
:meth:`JobQueue.reset_interrupted` puts a series that was being scored back to ``complete``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, state TEXT NOT NULL, caller TEXT,
    first_arrival REAL, last_arrival REAL, n_stored INTEGER DEFAULT 0, content_hash TEXT,
    reason TEXT, updated REAL, attempts INTEGER DEFAULT 0, attempt_hash TEXT, poison TEXT,
    not_before REAL DEFAULT 0, purged_n INTEGER
);
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, content_hash TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER DEFAULT 0, next_try REAL DEFAULT 0, last_error TEXT,
    sr_uid TEXT, patient_p REAL, suspected INTEGER, n_files INTEGER, last_arrival REAL, created REAL,
    sent_at REAL, UNIQUE(series_uid, content_hash)
);
CREATE TABLE IF NOT EXISTS events (t REAL, kind TEXT, subject TEXT, detail TEXT, count INTEGER DEFAULT 1,
    last REAL);
CREATE INDEX IF NOT EXISTS series_state ON series (state, last_arrival);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, created);
CREATE INDEX IF NOT EXISTS events_t ON events (t);
"""
ADDED_COLUMNS = {  # columns newer than the first schema: added to a queue made before them
    "series": (
        "attempts INTEGER DEFAULT 0",
        "attempt_hash TEXT",
        "poison TEXT",
        "not_before REAL DEFAULT 0",
        "purged_n INTEGER",
    ),
    "events": ("count INTEGER DEFAULT 1", "last REAL"),
}

SERIES_STATES = ("receiving", "complete", "scoring", "answered", "failed", "quarantined")
JOB_STATES = ("sending", "sent", "dead")


class _Database:
    """Thread-safe access to the queue database (one connection, one lock)."""

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for table, columns in ADDED_COLUMNS.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for col in columns if have else ():
                if col.split()[0] not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {col}")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]


class _SeriesTable(_Database):
    """Series: received, complete, scored (each attempt counted), answered, refused or quarantined."""

    def received(self, series_uid: str, study_uid: str, caller: str, t: float | None = None) -> None:
        """An instance of the series is on disk: (re)open the series, its idle clock restarted."""
        t = time.time() if t is None else t
        with self._tx() as db:
            db.execute(
                "INSERT INTO series (series_uid, study_uid, state, caller, first_arrival, last_arrival, "
                "n_stored, updated) VALUES (?, ?, 'receiving', ?, ?, ?, 1, ?) "
                "ON CONFLICT(series_uid) DO UPDATE SET state='receiving', caller=excluded.caller, "
                "last_arrival=excluded.last_arrival, n_stored=n_stored+1, reason=NULL, "
                "updated=excluded.updated, not_before=0, "
                "attempts=CASE WHEN state='quarantined' THEN 0 ELSE attempts END, "
                "poison=CASE WHEN state='quarantined' THEN NULL ELSE poison END, "
                "first_arrival=CASE WHEN state IN ('answered', 'failed', 'quarantined') "
                "THEN excluded.first_arrival ELSE first_arrival END",
                (series_uid, study_uid, caller, t, t, t),
            )

    def promote_idle(self, idle_s: float, busy: set[str] = frozenset(), now: float | None = None) -> int:
        """``receiving`` series with no instance for ``idle_s`` become ``complete`` — except the ``busy``
        ones, still being sent to by an open association; returns how many."""
        now = time.time() if now is None else now
        with self._tx() as db:
            rows = db.execute(
                "SELECT series_uid FROM series WHERE state='receiving' AND last_arrival <= ?", (now - idle_s,)
            ).fetchall()
            ready = [r[0] for r in rows if r[0] not in busy]
            db.executemany(
                "UPDATE series SET state='complete', updated=? WHERE series_uid=?", [(now, u) for u in ready]
            )
            return len(ready)

    def restart_idle_clocks(self, now: float | None = None) -> int:
        """After a restart: series still receiving get a whole ``idle_s`` from now (their senders could
        not reach a stopped node, and may be about to send the rest)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute("UPDATE series SET last_arrival=? WHERE state='receiving'", (now,)).rowcount

    def mark_poison(self, series_uid: str, reason: str) -> None:
        """The series broke a limit while it was received: it will be quarantined, not scored (the first
        reason is kept)."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET poison=COALESCE(poison, ?), updated=? WHERE series_uid=?",
                (reason, time.time(), series_uid),
            )

    def next_complete(self, now: float | None = None) -> dict[str, Any] | None:
        """The complete series that has waited longest (and is not waiting out a retry delay), now
        ``scoring`` (None when there is none)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM series WHERE state='complete' AND COALESCE(not_before, 0) <= ? "
                "ORDER BY last_arrival LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE series SET state='scoring', updated=? WHERE series_uid=?", (time.time(), row[0])
            )
            return dict(row)

    def set_series(
        self, series_uid: str, state: str, *, reason: str | None = None, content_hash=None
    ) -> None:
        """Move a series that is being scored on (a newer instance reopened it: left ``receiving``)."""
        if state not in SERIES_STATES:
            raise ValueError(f"unknown series state {state!r}")
        with self._tx() as db:
            db.execute(
                "UPDATE series SET state=?, reason=?, content_hash=COALESCE(?, content_hash), updated=? "
                "WHERE series_uid=? AND state='scoring'",
                (state, reason, content_hash, time.time(), series_uid),
            )

    def start_attempt(self, series_uid: str, content_hash: str) -> int:
        """Count one more attempt at scoring the series as its instances stand (``content_hash``; other
        instances than the last attempt's start the count again) before it is made; returns the count."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET attempts=CASE WHEN attempt_hash IS ? THEN attempts + 1 ELSE 1 END, "
                "attempt_hash=?, updated=? WHERE series_uid=?",
                (content_hash, content_hash, time.time(), series_uid),
            )
            row = db.execute("SELECT attempts FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            return int(row[0]) if row else 0

    def mark_purged(self, series_uid: str, n: int) -> None:
        """The series' ``n`` instances were purged: a re-send of fewer is not answered as complete."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET purged_n=MAX(COALESCE(purged_n, 0), ?), updated=? WHERE series_uid=?",
                (int(n), time.time(), series_uid),
            )

    def count_failure(self, series_uid: str) -> int:
        """One more failed attempt at the series (one that failed before it could start); the count."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET attempts=COALESCE(attempts, 0) + 1 WHERE series_uid=?", (series_uid,)
            )
            row = db.execute("SELECT attempts FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            return int(row[0]) if row else 0

    def uncount_attempt(self, series_uid: str) -> None:
        """The last attempt was not the series' fault (disk full, models missing): it does not count."""
        with self._tx() as db:
            db.execute("UPDATE series SET attempts=MAX(0, attempts - 1) WHERE series_uid=?", (series_uid,))

    def retry_later(self, series_uid: str, reason: str, delay_s: float) -> None:
        """A series being scored goes back to ``complete``, not taken again for ``delay_s``."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET state='complete', reason=?, not_before=?, updated=? "
                "WHERE series_uid=? AND state='scoring'",
                (reason, time.time() + delay_s, time.time(), series_uid),
            )

    def reset_interrupted(self) -> int:
        """After a restart: series that were being scored go back to ``complete``."""
        with self._tx() as db:
            return db.execute("UPDATE series SET state='complete' WHERE state='scoring'").rowcount

    def series(self, state: str | None = None, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        where = "" if state is None else "WHERE state=? "
        args = () if state is None else (state,)
        sql = f"SELECT * FROM series {where}ORDER BY last_arrival DESC LIMIT ? OFFSET ?"
        return self._rows(sql, *args, int(limit), int(offset))

    def one_series(self, series_uid: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM series WHERE series_uid=?", series_uid)
        return rows[0] if rows else None

    def series_counts(self) -> dict[str, int]:
        return {
            r["state"]: r["n"] for r in self._rows("SELECT state, COUNT(*) AS n FROM series GROUP BY state")
        }


class _JobTable(_SeriesTable):
    """Jobs: published results, sent, or dead-lettered."""

    def job_for(self, series_uid: str, content_hash: str) -> dict[str, Any] | None:
        rows = self._rows(
            "SELECT * FROM jobs WHERE series_uid=? AND content_hash=?", series_uid, content_hash
        )
        return rows[0] if rows else None

    def add_job(self, job: dict[str, Any]) -> None:
        """Record a published result (state ``sending``) and mark its series answered, in one step."""
        cols = ("job", "series_uid", "study_uid", "content_hash", "sr_uid", "patient_p", "suspected")
        cols += ("n_files", "last_arrival")
        values = [job.get(c) for c in cols]
        with self._tx() as db:
            db.execute(
                f"INSERT OR IGNORE INTO jobs ({', '.join(cols)}, state, created) "
                f"VALUES ({', '.join('?' * len(cols))}, 'sending', ?)",
                (*values, time.time()),
            )
            db.execute(
                "UPDATE series SET state='answered', content_hash=?, reason=NULL, updated=?, purged_n=NULL "
                "WHERE series_uid=? AND state='scoring'",
                (job["content_hash"], time.time(), job["series_uid"]),
            )

    def recover_job(self, job: dict[str, Any], *, sent: bool, answered: bool) -> None:
        """Record a job found published in the spool but missing here (a crash came between the two);
        ``answered``: its series still holds exactly those instances, so it needs no new answer."""
        cols = (
            "job",
            "series_uid",
            "study_uid",
            "content_hash",
            "sr_uid",
            "patient_p",
            "suspected",
            "n_files",
        )
        with self._tx() as db:
            db.execute(
                f"INSERT OR IGNORE INTO jobs ({', '.join(cols)}, state, created, sent_at) "
                f"VALUES ({', '.join('?' * len(cols))}, ?, ?, ?)",
                (
                    *[job.get(c) for c in cols],
                    "sent" if sent else "sending",
                    time.time(),
                    time.time() if sent else None,
                ),
            )
            if answered:
                db.execute(
                    "UPDATE series SET state='answered', content_hash=?, updated=? "
                    "WHERE series_uid=? AND state IN ('complete', 'scoring')",
                    (job["content_hash"], time.time(), job["series_uid"]),
                )

    def due_jobs(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        return self._rows("SELECT * FROM jobs WHERE state='sending' AND next_try <= ? ORDER BY created", now)

    def job_sent(self, job: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state='sent', sent_at=?, last_error=NULL WHERE job=?", (time.time(), job)
            )

    def job_failed(self, job: str, error: str, retry_in: float) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET attempts=attempts+1, last_error=?, next_try=? WHERE job=?",
                (error, time.time() + retry_in, job),
            )

    def job_dead(self, job: str, reason: str) -> None:
        """Dead-lettered: not sent again (its folder is in ``dead_letter/``). A job the queue never
        recorded (found damaged at start-up) is recorded so, from its name ``<series>-<hash prefix>``."""
        series_uid, _, prefix = job.rpartition("-")
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (job, series_uid, study_uid, content_hash, state, created) "
                "VALUES (?, ?, '(unknown)', ?, 'dead', ?)",
                (job, series_uid or job, prefix or job, now),
            )
            db.execute(
                "UPDATE jobs SET state='dead', attempts=attempts+1, last_error=?, next_try=? WHERE job=?",
                (reason, now, job),
            )

    def jobs(self, state: str | None = None, limit: int = -1, offset: int = 0) -> list[dict[str, Any]]:
        where = "" if state is None else "WHERE state=? "
        args = () if state is None else (state,)
        sql = f"SELECT * FROM jobs {where}ORDER BY created DESC LIMIT ? OFFSET ?"
        return self._rows(sql, *args, int(limit), int(offset))

    def jobs_of(self, series_uid: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM jobs WHERE series_uid=? ORDER BY created", series_uid)

    def job_counts(self) -> dict[str, int]:
        return {
            r["state"]: r["n"] for r in self._rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        }


class JobQueue(_JobTable):
    """The node's queue: series, jobs and events (:mod:`.queue`)."""

    def event(self, kind: str, subject: str, detail: str, count: int = 1) -> None:
        """Record a refusal or notice (``count``: how many like it it stands for)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", (now, kind, subject, detail, count, now)
            )

    def event_count(self) -> int:
        return int(self._rows("SELECT COUNT(*) AS n FROM events")[0]["n"])

    def events(self, limit: int = 200, offset: int = 0) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM events ORDER BY t DESC LIMIT ? OFFSET ?", int(limit), int(offset))

    def prune_events(self, keep: int = 10_000, older_than_s: float | None = None) -> int:
        """Delete events older than ``older_than_s`` and all but the newest ``keep``; returns how many."""
        with self._tx() as db:
            n = 0
            if older_than_s is not None:
                n += db.execute("DELETE FROM events WHERE t < ?", (time.time() - older_than_s,)).rowcount
            n += db.execute(
                "DELETE FROM events WHERE rowid NOT IN (SELECT rowid FROM events ORDER BY t DESC LIMIT ?)",
                (int(keep),),
            ).rowcount
            return n
