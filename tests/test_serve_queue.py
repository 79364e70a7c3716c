"""The node's spool, queue and settings on their own (no network): durable instance files whose names
cannot escape the spool, the series/job state machine that makes a study answered once, recovery steps,
and settings that refuse to start a node that could not work."""

from __future__ import annotations

import time

import pytest

from cervspine.dicom.queue import JobQueue
from cervspine.dicom.spool import Spool

S1, S2, ST = "1.2.3.4.1", "1.2.3.4.2", "1.2.3.4"


@pytest.fixture
def spool(tmp_path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def queue(spool) -> JobQueue:
    q = JobQueue(spool.db)
    yield q
    q.close()


def test_instances_are_stored_whole_and_names_cannot_escape_the_spool(spool, tmp_path):
    path = spool.store(S1, "1.2.3.4.1.7", b"DICM-bytes")
    assert path == spool.root / "incoming" / S1 / "1.2.3.4.1.7.dcm" and path.read_bytes() == b"DICM-bytes"
    assert not list(path.parent.glob(".*tmp*"))  # no temporary file left behind
    for bad in ("../../etc/passwd", "1.2.3/../../x", "1.2.3 ", "", "1." * 40):
        with pytest.raises(ValueError, match="not a UID"):
            spool.store(S1, bad, b"x")
        with pytest.raises(ValueError, match="not a UID"):
            spool.store(bad, "1.2.3", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool"]


def test_the_content_hash_is_the_instances_byte_for_byte(spool):
    spool.store(S1, "1.1", b"a")
    spool.store(S1, "1.2", b"b")
    h, n = spool.content_hash(S1)
    spool.store(S1, "1.2", b"b")  # sent again, identical
    assert spool.content_hash(S1) == (h, n) and n == 2
    spool.store(S1, "1.2", b"B")  # one instance changed
    assert spool.content_hash(S1)[0] != h
    spool.store(S1, "1.2", b"b")
    spool.store(S1, "1.3", b"c")  # one instance more
    assert spool.content_hash(S1)[1] == 3


def test_a_series_goes_from_receiving_to_answered_once(queue):
    t0 = time.time()
    queue.received(S1, ST, "PACS", t=t0 - 10)
    queue.received(S2, ST, "PACS", t=t0 - 10)
    assert queue.promote_idle(5.0, busy={S2}) == 1  # S2: an open association is still sending to it
    assert queue.promote_idle(60.0) == 0
    row = queue.next_complete()
    assert row["series_uid"] == S1 and queue.one_series(S1)["state"] == "scoring"
    assert queue.next_complete() is None
    job = {"job": f"{S1}-abc", "series_uid": S1, "study_uid": ST, "content_hash": "abc", "sr_uid": "9.9"}
    queue.add_job(job)
    assert queue.one_series(S1)["state"] == "answered" and queue.job_for(S1, "abc")["state"] == "sending"
    queue.add_job(job)  # recorded twice (a crash between publish and record): still one job
    assert len(queue.jobs()) == 1
    queue.job_failed(job["job"], "association rejected", retry_in=30)
    assert queue.due_jobs() == [] and queue.jobs()[0]["attempts"] == 1
    assert [j["job"] for j in queue.due_jobs(now=time.time() + 31)] == [job["job"]]
    queue.job_sent(job["job"])
    assert queue.jobs("sent")[0]["sent_at"] and queue.due_jobs(now=time.time() + 999) == []


def test_an_instance_during_scoring_reopens_the_series_and_a_restart_resumes(queue):
    queue.received(S1, ST, "PACS", t=time.time() - 10)
    queue.promote_idle(1.0)
    queue.next_complete()
    queue.received(S1, ST, "PACS")  # more arrives while it is being scored
    queue.add_job({"job": "j1", "series_uid": S1, "study_uid": ST, "content_hash": "h1"})
    assert queue.one_series(S1)["state"] == "receiving"  # answered for h1; will complete again (h2)
    queue.promote_idle(0.0)
    queue.next_complete()
    assert queue.reset_interrupted() == 1 and queue.one_series(S1)["state"] == "complete"  # killed: redo
    queue.received(S2, ST, "PACS", t=time.time() - 100)
    assert queue.restart_idle_clocks() == 1 and queue.promote_idle(5.0) == 0  # a fresh idle_s after restart
    queue.recover_job(
        {"job": "j2", "series_uid": S1, "study_uid": ST, "content_hash": "h2"}, sent=True, answered=True
    )
    assert queue.one_series(S1)["state"] == "answered" and queue.job_for(S1, "h2")["state"] == "sent"


def test_settings_refuse_a_node_that_could_not_work(tmp_path):
    from cervspine.dicom.settings import Destination, NodeSettings

    dest = Destination("127.0.0.1", 4242, "ORTHANC")
    with pytest.raises(ValueError, match="allowed_callers is empty"):
        NodeSettings(spool=tmp_path, destination=dest, allowed_callers=())
    with pytest.raises(ValueError, match="not a DICOM AE title"):
        NodeSettings(
            spool=tmp_path, destination=dest, allowed_callers=({"ae_title": "A" * 17, "address": "::1"},)
        )
    for bare in (("PACS",), "PACS"):  # the old form: an AE title alone proves nothing
        with pytest.raises(ValueError, match=r"AE title alone.*\{ae_title: PACS, address: 10.0.0.5/32\}"):
            NodeSettings(spool=tmp_path, destination=dest, allowed_callers=bare)
    for entry, why in (
        ({"ae_title": "PACS"}, "needs both"),
        ({"ae_title": "PACS", "address": "no such host."}, "neither"),
    ):
        with pytest.raises(ValueError, match=why):
            NodeSettings(spool=tmp_path, destination=dest, allowed_callers=(entry,))
    with pytest.raises(ValueError, match="not a TCP port"):
        Destination("127.0.0.1", 70000, "ORTHANC")
    callers = ({"ae_title": " PACS ", "address": "10.0.0.0/24"}, {"ae_title": "CT2", "address": "localhost"})
    s = NodeSettings(
        spool=tmp_path, destination=dest, allowed_callers=callers, retry_initial_s=2, retry_max_s=20
    )
    assert [str(c) for c in s.allowed_callers] == ["PACS@10.0.0.0/24", "CT2@localhost"]
    assert s.idle_s == 60  # real PACS pause between instances (conf/serve.yaml says why)
    assert s.callers.admits("PACS", "10.0.0.77") and s.callers.admits("CT2", "127.0.0.1")
    assert s.callers.admits("PACS", "::ffff:10.0.0.5")  # IPv4-mapped, as a dual-stack socket gives it
    assert not s.callers.admits("PACS", "10.0.1.5") and not s.callers.admits("CT2", "10.0.0.5")
    assert s.callers.knows_address("10.0.0.9") and not s.callers.knows_address("192.168.0.1")
    assert [s.backoff(n) for n in range(1, 6)] == [2, 4, 8, 16, 20]


def test_the_serve_config_builds_the_documented_command_line(tmp_path):
    from hydra.utils import instantiate

    from cervspine.config import composed

    overrides = [
        f"spool={tmp_path}", "port=11113", "ae_title=CERVSPINE",
        "allowed_callers=[{ae_title:PACS,address:10.0.0.5},{ae_title:ORTHANC,address:10.0.0.0/24}]",
        "destination.host=10.0.0.5", "destination.port=104", "destination.ae_title=PACS", "idle_s=7",
        "http_port=8099", "timeouts.acse_s=3", "limits.instances_per_series=10", "scoring.attempts=5",
        "retry.attempts=7",
    ]  # fmt: skip
    with composed("serve", overrides, tmp_path / "run") as cfg:
        s = instantiate(cfg.node)
    assert (s.port, s.ae_title, [str(c) for c in s.allowed_callers], s.idle_s, s.http_port) == (
        11113, "CERVSPINE", ["PACS@10.0.0.5", "ORTHANC@10.0.0.0/24"], 7, 8099
    )  # fmt: skip
    assert (s.destination.host, s.destination.port, s.destination.ae_title) == ("10.0.0.5", 104, "PACS")
    assert (s.timeouts.acse_s, s.timeouts.connection_s, s.timeouts.dimse_s, s.timeouts.network_s) == (
        3,
        10,
        60,
        60,
    )
    assert (s.limits.instances_per_series, s.scoring.attempts, s.scoring.isolate, s.send_attempts) == (
        10,
        5,
        True,
        7,
    )
    assert s.scoring.memory_mb == 16384 and s.limits.min_free_disk_gb == 2
    assert not s.tls.receive and not s.tls.send and s.status_token is None and s.status_hosts == ()


def test_retention_purges_finished_series_under_their_lock_and_old_folders_by_age(spool, queue, tmp_path):
    import os
    import threading

    from cervspine.dicom.answer import Answerer
    from cervspine.dicom.retention import Retention
    from cervspine.dicom.settings import ScoringSettings

    old = time.time() - 10 * 86400
    for i in range(3):
        spool.store(S1, f"1.2.3.4.1.{i}", b"x")
    queue.received(S1, ST, "PACS", t=old)
    queue.promote_idle(0.0, now=old + 1)
    queue.next_complete()
    queue.add_job({"job": "j1", "series_uid": S1, "study_uid": ST, "content_hash": "h1"})
    with queue._tx() as db:  # answered ten days ago
        db.execute("UPDATE series SET updated=?", (old,))
    retention = Retention(spool, queue, retain_days=7)
    with spool.lock(S1):  # an instance of the same series arrives while the purge is due
        purge = threading.Thread(target=lambda: retention.step(force=True))
        purge.start()
        time.sleep(0.2)
        spool.store(S1, "1.2.3.4.1.9", b"new")  # stored and acknowledged under the series' lock
        queue.received(S1, ST, "PACS")
    purge.join()
    assert (spool.series_dir(S1) / "1.2.3.4.1.9.dcm").read_bytes() == b"new"  # not deleted
    assert spool.count(S1) == 4 and queue.one_series(S1)["state"] == "receiving"

    queue.promote_idle(0.0, now=time.time() + 1)
    queue.next_complete()
    queue.add_job({"job": "j2", "series_uid": S1, "study_uid": ST, "content_hash": "h2"})
    with queue._tx() as db:
        db.execute("UPDATE series SET updated=?", (old,))
    for sub in ("sent", "reports", "studies", "dead_letter", "quarantine", "outbox"):
        for name, t in (("old", old), ("new", time.time())):
            (spool.sub(sub) / name).mkdir()
            os.utime(spool.sub(sub) / name, (t, t))
    done = retention.step(force=True)
    assert done["series"] == 1 and not spool.instances(S1) and queue.one_series(S1)["purged_n"] == 4
    assert all(done[sub] == 1 for sub in ("sent", "reports", "studies", "dead_letter", "quarantine"))
    for sub in ("sent", "reports", "studies", "dead_letter", "quarantine"):
        assert sorted(p.name for p in spool.sub(sub).iterdir()) == ["new"]
    assert sorted(p.name for p in spool.sub("outbox").iterdir()) == ["new", "old"]  # pending: never purged

    spool.store(S1, "1.2.3.4.1.0", b"x")  # the PACS sends one instance again: not the whole series
    queue.received(S1, ST, "PACS", t=time.time() - 10)
    queue.promote_idle(1.0)
    assert Answerer(spool, queue, None, ScoringSettings()).step()
    row = queue.one_series(S1)
    assert (
        row["state"] == "failed"
        and "1 of the 4 instances" in row["reason"]
        and "whole series" in row["reason"]
    )
