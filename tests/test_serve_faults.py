"""The node's faults, one at a time (issue 29): loops that outlive their errors and say so, refusals that
cannot flood the queue, limits on what may arrive, damaged or refused results dead-lettered with their
reason, series that fail or crash their worker quarantined while the queue moves on, and idle sockets
that cannot starve the PACS. Real pieces: the node's SCP on a free port, a real Orthanc as the
destination, a spawned worker process with its memory limit, the premove models."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from cervspine.dicom import orthanc
from cervspine.dicom.answer import Answerer
from cervspine.dicom.events import EventLimiter
from cervspine.dicom.faults import CRASH_ENV
from cervspine.dicom.isolation import InProcessScoring, WorkerProcessScoring
from cervspine.dicom.liveness import Loop, health
from cervspine.dicom.queue import JobQueue
from cervspine.dicom.settings import Destination, NodeSettings, ScoringSettings
from cervspine.dicom.spool import Spool
from cervspine.dicom.worker import Scorer

PREMOVE = Path(__file__).parent / "data" / "premove"
CT = "1.2.840.10008.5.1.4.1.1.2"
NODE_AE = "CERVSPINE"
needs_orthanc = pytest.mark.skipif(not orthanc.available(), reason="no Orthanc (make dicom-tools)")


def premove_predictor():
    from cervspine.inference import Predictor

    return Predictor.from_checkpoints(PREMOVE / "stage1.ckpt", [PREMOVE / "slice.ckpt"], device="cpu")


def make_series(folder: Path, seed: int, uid: str, n: int = 8) -> list[Path]:
    from cervspine.synthetic import write_study

    write_study(folder, seed=seed, size=32, n_slices=n, uid=uid)
    return sorted(folder.glob("*.dcm"))


def spool_series(spool: Spool, queue: JobQueue, files: list[Path], t: float) -> str:
    """Put ``files`` into the spool as a received, complete series; its UID."""
    series = study = ""
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        series, study = str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)
        spool.store(series, str(ds.SOPInstanceUID), f.read_bytes())
    queue.received(series, study, "PACS", t=t)
    queue.promote_idle(0.0, now=t + 1)
    return series


def settings(tmp_path: Path, dest_port: int = 9, **kw) -> NodeSettings:
    base = dict(
        spool=tmp_path / "spool", destination=Destination("127.0.0.1", dest_port, "ORTHANC"),
        allowed_callers=({"ae_title": "PACS", "address": "127.0.0.1"},), port=0, http_port=None,
        synthetic=True, idle_s=0.5, poll_s=0.05, retry_initial_s=0.05, retry_max_s=0.1,
        timeouts={"connection_s": 2, "acse_s": 1, "dimse_s": 10, "network_s": 10},
    )  # fmt: skip
    return NodeSettings(**{**base, **kw})


# ----------------------------------------------------------------------------- loops and events


def test_a_loop_outlives_failing_steps_and_reports_them():
    calls, stop = [], threading.Event()

    def step() -> bool:
        calls.append(time.time())
        if len(calls) <= 2:
            raise OSError("database is locked")  # e.g. SQLite busy: the loop must not end
        if len(calls) == 3:
            raise SystemExit("even this")
        return len(calls) < 6

    loop = Loop("sender", step, stop, idle_s=0.01, backoff_max_s=0.05).start()
    deadline = time.time() + 10
    while len(calls) < 7 and time.time() < deadline:
        time.sleep(0.01)
    info = loop.info()
    stop.set()
    loop.join(5)
    assert len(calls) >= 7 and info["alive"] and info["errors"] == 3 and info["errors_in_a_row"] == 0
    assert info["last_error"] == "SystemExit: even this" and info["last_progress"] >= calls[3]
    assert calls[1] - calls[0] >= 0.045 and loop.backoff() == 0.05  # backed off, capped
    ok = health([info, {"name": "listener", "alive": True, "stalled": False}])
    assert ok == {"ok": True, "problems": []}
    dead = health([{**info, "alive": False}, {**info, "name": "scorer", "stalled": True}])
    assert not dead["ok"] and dead["problems"] == [
        "sender: not running",
        "scorer: one step running for too long",
    ]


def test_refusals_from_one_peer_are_folded_into_counted_events(tmp_path):
    queue = JobQueue(tmp_path / "q.sqlite")
    events = EventLimiter(queue, every_s=60, per_window=5)
    for i in range(500):  # one peer trying AE titles: one row, the rest counted
        events.event("association refused", f"X{i}", "not allowed", key=("10.9.9.9",))
    for i in range(50):  # many peers: beyond per_window, folded under one key
        events.event("connection refused", f"10.0.{i}.1", "closed unread", key=(f"10.0.{i}.1",))
    assert len(queue.events(limit=1000)) == 5 + 1  # 5 a window, then one row folding the rest
    events.flush(force=True)
    rows = queue.events(limit=1000)
    assert sum(r["count"] for r in rows if r["kind"] == "association refused") == 500
    assert sum(r["count"] for r in rows if r["kind"] == "connection refused") == 50
    assert len(rows) <= 8
    assert queue.prune_events(keep=3) == len(rows) - 3 and len(queue.events()) == 3
    queue.close()


# ----------------------------------------------------------------------------- quarantine


def test_a_series_whose_scoring_keeps_failing_is_quarantined_and_the_queue_moves_on(tmp_path):
    """An attempt that fails outside the models too (a file that cannot be read for the content hash):
    counted, retried after a wait, quarantined after ``attempts``; the series behind it is answered."""
    spool, queue = Spool(tmp_path / "spool"), JobQueue(tmp_path / "spool" / "queue.sqlite")
    t = time.time() - 100
    bad = spool_series(spool, queue, make_series(tmp_path / "bad", 1, "1.2.826.0.1.3680043.991.1"), t)
    good = spool_series(spool, queue, make_series(tmp_path / "good", 2, "1.2.826.0.1.3680043.991.2"), t + 1)
    (spool.series_dir(bad) / "9.9.dcm").mkdir()  # reading it raises IsADirectoryError
    scoring = InProcessScoring(Scorer(spool, premove_predictor, None, True))
    answer = Answerer(spool, queue, scoring, ScoringSettings(attempts=2, retry_s=0.2, retry_max_s=0.2))
    errors = 0
    deadline = time.time() + 120
    while queue.series_counts().get("complete", 0) and time.time() < deadline:
        try:
            answer.step() or time.sleep(0.05)
        except IsADirectoryError:
            errors += 1
    assert errors == 2
    row = queue.one_series(bad)
    assert (
        row["state"] == "quarantined"
        and "2 attempts" in row["reason"]
        and "IsADirectoryError" in row["reason"]
    )
    assert str(spool.root) not in row["reason"]
    reason = json.loads((spool.sub("quarantine") / bad / "reason.json").read_text())
    assert reason["reason"] == row["reason"] and not spool.instances(bad)
    assert queue.one_series(good)["state"] == "answered" and len(queue.jobs_of(good)) == 1
    kinds = [e["kind"] for e in queue.events()]
    assert kinds.count("scoring failed") == 1 and "series quarantined" in kinds
    queue.close()


def test_a_series_that_crashes_or_exhausts_its_worker_is_quarantined_and_the_node_lives(
    tmp_path, monkeypatch
):
    """Scoring in a spawned worker with a data-memory limit: a series whose decoding kills the worker
    (SIGKILL, as a segfaulting decoder would) and one that asks for more memory than the limit are each
    quarantined with their reason; this process (the node) lives on, and a fresh worker answers the next."""
    spool, queue = Spool(tmp_path / "spool"), JobQueue(tmp_path / "spool" / "queue.sqlite")
    t = time.time() - 100
    crash = spool_series(spool, queue, make_series(tmp_path / "c", 1, "1.2.826.0.1.3680043.992.1"), t)
    bomb = spool_series(spool, queue, make_series(tmp_path / "m", 2, "1.2.826.0.1.3680043.992.2"), t + 1)
    good = spool_series(spool, queue, make_series(tmp_path / "g", 3, "1.2.826.0.1.3680043.992.3"), t + 2)
    monkeypatch.setenv(CRASH_ENV, f"decoding:1@{crash},memory:1@{bomb}")
    factory = functools.partial(premove_predictor)
    scoring = WorkerProcessScoring(spool, factory, None, True, memory_mb=3000, timeout_s=300)
    scoring.warm_up()
    limits, deadline = "", time.time() + 120
    while str(3000 << 20) not in limits and time.time() < deadline:  # set as the worker starts
        limits = Path(f"/proc/{scoring._proc.pid}/limits").read_text()
        time.sleep(0.1)
    answer = Answerer(spool, queue, scoring, ScoringSettings(attempts=1, retry_s=0.1, retry_max_s=0.1))
    try:
        deadline = time.time() + 300
        while queue.series_counts().get("complete", 0) and time.time() < deadline:
            answer.step() or time.sleep(0.05)
    finally:
        scoring.close()
    data_limit = next(line for line in limits.splitlines() if line.startswith("Max data size")).split()
    assert data_limit[3] == str(3000 << 20)  # the worker ran under its limit
    crashed, exhausted = queue.one_series(crash), queue.one_series(bomb)
    assert crashed["state"] == "quarantined" and "the worker died" in crashed["reason"]
    assert "SIGKILL" in crashed["reason"]
    assert exhausted["state"] == "quarantined" and "MemoryError" in exhausted["reason"]
    assert "data limit of 3000 MiB" in exhausted["reason"]
    assert queue.one_series(good)["state"] == "answered"
    assert sorted(p.name for p in spool.sub("quarantine").iterdir()) == sorted([crash, bomb])
    queue.close()


# ----------------------------------------------------------------------------- what may arrive


def _stores(port: int, files: list[Path], host: str = "127.0.0.1") -> list[int]:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(host, 0))
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


@pytest.fixture
def scp_for(tmp_path):
    """Start the node's SCP (only) with the given settings; stopped after the test."""
    from cervspine.dicom.scp import StoreSCP

    started = []

    def start(**kw):
        s = settings(tmp_path / f"n{len(started)}", **kw)
        spool = Spool(s.spool)
        scp = StoreSCP(s, spool, JobQueue(spool.db))
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()
        scp.queue.close()


def test_instances_over_the_limits_are_refused_with_0xa700_and_their_series_is_poison(
    scp_for, tmp_path, caplog
):
    files = make_series(tmp_path / "s", 4, "1.2.826.0.1.3680043.993.1", n=6)
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    scp = scp_for(limits={"instances_per_series": 4})
    assert _stores(scp.port, files) == [0, 0, 0, 0, 0xA700, 0xA700]
    assert _stores(scp.port, files[:1]) == [0]  # an instance it holds already may come again
    row = scp.queue.one_series(series)
    assert "limits.instances_per_series: 4 instances stored already" in row["poison"]
    assert any("limits.instances_per_series" in r.getMessage() for r in caplog.records)
    answer = Answerer(scp.spool, scp.queue, None, ScoringSettings())  # poison: never scored
    scp.queue.promote_idle(0.0, now=time.time() + 1)
    assert answer.step() and scp.queue.one_series(series)["state"] == "quarantined"
    assert (scp.spool.sub("quarantine") / series / "reason.json").is_file()

    big = scp_for(limits={"pixels_per_slice": 1000})  # 32 x 32 = 1024
    assert _stores(big.port, files[:2]) == [0xA700, 0xA700]
    assert "Rows x Columns 1024 > 1000" in big.queue.one_series(series)["poison"]
    assert not big.spool.instances(series)

    for limits, name in (({"min_free_disk_gb": 1e9}, "min_free_disk_gb"), ({"spool_gb": 1e-9}, "spool_gb")):
        full = scp_for(limits=limits)
        caplog.clear()
        assert _stores(full.port, files[:2]) == [0xA700, 0xA700]
        assert any(f"limits.{name}" in r.getMessage() for r in caplog.records)
        assert full.queue.one_series(series) is None  # not the series' fault: nothing poisoned


def test_idle_sockets_cannot_starve_the_pacs(scp_for, tmp_path):
    """50 sockets held open from an address no caller has are closed unread; the PACS's own address may
    hold only max_connections_per_peer, idle ones are dropped after the ACSE timeout; the PACS gets in."""
    files = make_series(tmp_path / "s", 5, "1.2.826.0.1.3680043.993.2", n=2)
    scp = scp_for(max_connections_per_peer=2, max_associations=4)
    flood = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", scp.port), timeout=5, source_address=("127.0.0.3", 0))
        flood.append(s)
    for s in flood[:5]:
        assert s.recv(1) == b""  # closed by the node without reading anything
    t0 = time.time()
    idle = [socket.create_connection(("127.0.0.1", scp.port), timeout=5) for _ in range(2)]
    time.sleep(0.2)
    third = socket.create_connection(("127.0.0.1", scp.port), timeout=5)
    assert third.recv(1) == b""  # over the per-peer cap
    while scp.gate.open_connections().get("127.0.0.1") and time.time() - t0 < 10:
        time.sleep(0.05)
    assert time.time() - t0 < 3  # the idle two were dropped after acse_s (1 s)
    assert _stores(scp.port, files) == [0, 0]  # and the PACS gets in, the flood still held open
    for s in [*flood, *idle, third]:
        s.close()
    scp.events.flush(force=True)
    rows = [e for e in scp.queue.events(limit=1000) if e["kind"] == "connection refused"]
    assert sum(r["count"] for r in rows if r["subject"] == "127.0.0.3") == 50 and len(rows) <= 4


# ----------------------------------------------------------------------------- dead letters


def _job(spool: Spool, files: list[Path], uid: str) -> str:
    """A published job of ``files`` in the outbox (as the scorer leaves one); its name."""
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    job = Spool.job_name(uid, "ab" * 32)
    out = spool.sub("outbox") / job
    out.mkdir(parents=True)
    for f in files:
        shutil.copy(f, out / f.name)
    manifest = {
        "job": job, "series_uid": uid, "study_uid": str(ds.StudyInstanceUID), "content_hash": "ab" * 32,
        "sr_uid": str(ds.SOPInstanceUID), "files": [f.name for f in files], "n_files": len(files),
        "sha256": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
        "record": {"SeriesInstanceUID": uid},
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return job


@needs_orthanc
def test_damaged_or_refused_results_are_dead_lettered_with_their_reason_and_the_rest_delivered(tmp_path):
    from cervspine.dicom.node import Node

    files = make_series(tmp_path / "src", 6, "1.2.826.0.1.3680043.994.1", n=5)
    unknown = tmp_path / "unknown.dcm"  # a SOP class no PACS knows: no presentation context accepted
    ds = pydicom.dcmread(files[4])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.994.9.1"
    ds.save_as(unknown, enforce_file_format=True)
    with orthanc.LocalOrthanc(tmp_path / "pacs") as pacs:
        s = settings(tmp_path, pacs.dicom_port, http_port=orthanc.free_port(), scoring={"isolate": False})
        spool = Spool(s.spool)
        good = _job(spool, files[:2], "1.2.826.0.1.3680043.994.2")
        changed = _job(spool, files[2:3], "1.2.826.0.1.3680043.994.3")
        (spool.sub("outbox") / changed / files[2].name).write_bytes(files[3].read_bytes())  # not as made
        garbage = _job(spool, files[3:4], "1.2.826.0.1.3680043.994.4")
        (spool.sub("outbox") / garbage / files[3].name).write_bytes(b"\0" * 300)
        refused = _job(spool, [unknown], "1.2.826.0.1.3680043.994.5")
        broken = _job(spool, files[:1], "1.2.826.0.1.3680043.994.6")
        (spool.sub("outbox") / broken / "manifest.json").write_text("{not json")
        for job in (changed, garbage):  # damaged after publication: checksum no longer matches / no DICOM
            m = json.loads((spool.sub("outbox") / job / "manifest.json").read_text())
            if job == garbage:
                m.pop("sha256")
            (spool.sub("outbox") / job / "manifest.json").write_text(json.dumps(m))
        node = Node(s, premove_predictor).start()
        try:
            deadline = time.time() + 60
            while node.queue.job_counts().get("sending") and time.time() < deadline:
                time.sleep(0.1)
            states = {j["job"]: (j["state"], j["last_error"]) for j in node.queue.jobs()}
            snap = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/status.json").read())
            with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/health") as r:
                assert r.status == 200 and json.loads(r.read())["ok"]
        finally:
            node.stop()
        assert states[good][0] == "sent"
        assert states[changed][0] == "dead" and "SHA-256 changed" in states[changed][1]
        assert states[garbage][0] == "dead" and "not a readable DICOM file" in states[garbage][1]
        assert states[refused][0] == "dead" and "no presentation context" in states[refused][1]
        assert states[broken][0] == "dead" and "manifest missing or damaged" in states[broken][1]
        for job in (changed, garbage, refused, broken):
            reason = json.loads((spool.sub("dead_letter") / job / "reason.json").read_text())
            assert reason["reason"] == states[job][1] and not (spool.sub("outbox") / job).exists()
        assert len(pacs.get("/instances")) == 2  # the good job's two objects, nothing of the others
        assert {t["name"] for t in snap["threads"]} == {"listener", "scheduler", "scorer", "sender"}
        assert all(t["alive"] for t in snap["threads"]) and snap["health"]["ok"]


def test_transient_failures_are_retried_then_dead_lettered_after_n(tmp_path):
    from cervspine.dicom.delivery import Delivery

    files = make_series(tmp_path / "src", 7, "1.2.826.0.1.3680043.995.1", n=1)
    s = settings(tmp_path, orthanc.free_port(), send_attempts=3)  # nobody listens there
    spool = Spool(s.spool)
    queue = JobQueue(spool.db)
    job = _job(spool, files, "1.2.826.0.1.3680043.995.2")
    queue.recover_job(
        json.loads((spool.sub("outbox") / job / "manifest.json").read_text()), sent=False, answered=False
    )
    delivery = Delivery(s, spool, queue)
    seen = []
    deadline = time.time() + 30
    while (
        queue.job_for("1.2.826.0.1.3680043.995.2", "ab" * 32)["state"] == "sending" and time.time() < deadline
    ):
        if delivery.step():
            seen.append(queue.job_for("1.2.826.0.1.3680043.995.2", "ab" * 32)["attempts"])
        time.sleep(0.02)
    row = queue.job_for("1.2.826.0.1.3680043.995.2", "ab" * 32)
    assert seen == [1, 2, 3] and row["state"] == "dead"
    assert "gave up after 3 transient failures" in row["last_error"] and "association" in row["last_error"]
    assert (spool.sub("dead_letter") / job / "reason.json").is_file()
    queue.close()
