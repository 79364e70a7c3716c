"""The one folder loop — ``predict`` on an RSNA folder (cached or in memory), a bundle's folder and the
Kaggle kit all run it — and its one promise: ``submission.csv`` holds every row of test.csv, always.

A study that cannot be read or scored is answered with the predictor's training prior (what is known
without looking; a missing row scores nothing), logged with its UID and reason, listed in
``failures.csv`` (UID, reason; no patient data) and its ``studies/<uid>.json`` says why. ``strict`` makes
any such failure an error instead (:class:`FolderFailures`, after every other study was scored and its
record written; no submission then). Torch-free: a bundle's runtime uses it too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cervspine import TARGETS
from cervspine.io.atomic import write_csv_atomic, write_json_atomic
from cervspine.jobs.records import study_record, submission_frame
from cervspine.scoring.answer import StudyPrediction
from cervspine.scoring.thresholds import OperatingThreshold

log = logging.getLogger(__name__)
SUBMISSION_CSV = "submission.csv"
FAILURES_CSV = "failures.csv"


class FolderFailures(RuntimeError):
    """``strict``: some studies could not be scored (``failed``: UID → reason)."""

    def __init__(self, failed: dict[str, str]):
        self.failed = dict(failed)
        lines = "".join(f"\n  {uid}: {why}" for uid, why in self.failed.items())
        super().__init__(f"{len(self.failed)} studies could not be scored (strict: no submission):{lines}")


@dataclass
class FolderResult:
    """Every study's (8,) answer (the prior for those in ``failed``), the files written, the time taken."""

    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # UID → why it was answered with the prior
    not_localised: dict[str, list[str]] = field(default_factory=dict)  # levels answered by the prior
    submission: Path | None = None
    failures: Path | None = None
    seconds: float = 0.0

    @property
    def seconds_per_study(self) -> float:
        return self.seconds / max(1, len(self.predictions) - len(self.failed))


def missing_folders(index: Any) -> dict[str, str]:
    """The test studies of an :class:`~cervspine.io.rsna.RsnaIndex` with no folder (UID → reason)."""
    uids = dict.fromkeys(index.test["StudyInstanceUID"])
    return {u: f"no study folder {index.study_dir(u)}" for u in uids if not index.study_dir(u).is_dir()}


def prior_record(uid: str, prior: np.ndarray, reason: str) -> dict[str, Any]:
    """The record of a study answered with the prior: the numbers, and why."""
    return {
        "StudyInstanceUID": uid,
        **{t: float(p) for t, p in zip(TARGETS, prior)},
        "answered_by": "training prior",
        "not_scored": reason,
    }


def _read_ahead(uids: list[str], read: Callable[[str], Any]) -> Iterable[tuple[str, Future]]:
    """(uid, its read) in order, the next study read on a thread while the current one is scored."""
    with ThreadPoolExecutor(1, thread_name_prefix="read-study") as reader:
        ahead = reader.submit(read, uids[0]) if uids else None
        for k, uid in enumerate(uids):
            current, ahead = ahead, (reader.submit(read, uids[k + 1]) if k + 1 < len(uids) else None)
            yield uid, current


def score_folder(
    test: pd.DataFrame,
    read: Callable[[str], Any],
    predict: Callable[[Any], StudyPrediction],
    prior: np.ndarray,
    out: str | Path,
    *,
    thresholds: OperatingThreshold | None = None,
    failed: dict[str, str] | None = None,
    strict: bool = False,
    scored: Callable[[str, Any, StudyPrediction], None] | None = None,
    submission: str | Path | None = None,
) -> FolderResult:
    """Score test.csv's studies (``read(uid)`` → a study, ``predict(study)`` → its answer) into ``out``:
    ``studies/<uid>.json`` each, ``failures.csv``, ``submission.csv``. ``failed``: studies known not to be
    scorable before (e.g. a cache entry that could not be built); ``scored(uid, study, pred)``: more to do
    with each scored study (a report; its errors are logged and cost nothing else); ``submission``: its
    path, if not ``out/submission.csv``."""
    out = Path(out)
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    result = FolderResult(failed={u: why for u, why in (failed or {}).items() if u in uids})
    todo = [u for u in uids if u not in result.failed]
    started = time.perf_counter()
    for k, (uid, study) in enumerate(_read_ahead(todo, read), start=1):
        try:
            loaded = study.result()
            pred = predict(loaded)
        except Exception as e:  # keep scoring the others
            result.failed[uid] = f"{type(e).__name__}: {e}"
            log.error("%s: answered with the training prior (%s)", uid, result.failed[uid])
            continue
        result.predictions[uid] = pred.probabilities
        result.not_localised[uid] = pred.not_localised
        write_json_atomic(out / "studies" / f"{uid}.json", study_record(pred, thresholds))
        if scored is not None:
            try:
                scored(uid, loaded, pred)
            except Exception:
                log.exception("%s: scored, but what follows scoring failed", uid)
        if k % 25 == 0 or k == len(todo):
            per = (time.perf_counter() - started) / k
            log.info("%d/%d studies, %.1f s/study, %.0f s left", k, len(todo), per, per * (len(todo) - k))
    result.seconds = time.perf_counter() - started
    prior = np.asarray(prior, dtype=np.float32)
    for uid, why in result.failed.items():
        result.predictions[uid] = prior
        write_json_atomic(out / "studies" / f"{uid}.json", prior_record(uid, prior, why))
    failures = pd.DataFrame({"StudyInstanceUID": list(result.failed), "reason": list(result.failed.values())})
    result.failures = write_csv_atomic(failures, out / FAILURES_CSV)
    _log_fallbacks(result, len(uids))
    if strict and result.failed:
        raise FolderFailures(result.failed)
    target = Path(submission) if submission is not None else out / SUBMISSION_CSV
    result.submission = write_csv_atomic(submission_frame(test, result.predictions), target)
    return result


def _log_fallbacks(result: FolderResult, n: int) -> None:
    """Which studies the prior answered, wholly or in part (UIDs only, no patient data)."""
    if result.failed:
        log.warning("%d of %d studies not scored, answered with the training prior (%s):", len(result.failed),
                    n, FAILURES_CSV)  # fmt: skip
        for uid, why in result.failed.items():
            log.warning("  %s: %s", uid, why)
    partly = {u: levels for u, levels in result.not_localised.items() if levels}
    if partly:
        log.warning("%d studies with levels stage 1 did not localise (answered by the prior):", len(partly))
        for uid, levels in partly.items():
            log.warning("  %s: %s", uid, ", ".join(levels))


def print_folder_result(result: FolderResult) -> None:
    """What an entry point prints of a folder run: the submission, and the studies the prior answered."""
    print(f"submission: {result.submission}")
    if result.failed:
        n, where = len(result.failed), result.failures
        print(f"{n} studies not scored, answered with the training prior ({where}):", file=sys.stderr)
        for uid, why in result.failed.items():
            print(f"  {uid}: {why}", file=sys.stderr)
