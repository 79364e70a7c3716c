"""The DICOM node against a real PACS: Orthanc on free localhost ports, studies sent by pynetdicom and
dcmtk's storescu, results read back through Orthanc's REST API; refusals, duplicates, an unreachable
destination, patient data, the status page in headless Chromium, and SIGKILLs of the real
``python -m cervspine.serve``: mid-association and mid-send here, mid-inference in ``make test-slow``
(and a kill under load in ``experiments/benchmarks/node.py``). Every test stands alone (any order)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cervspine import TARGETS
from cervspine.dicom import orthanc
from cervspine.dicom.sr import read_sr

pytestmark = pytest.mark.skipif(
    not orthanc.available(),
    reason="no Orthanc (Debian package 'orthanc'; `make dicom-tools` installs it as root)",
)

PREMOVE = Path(__file__).parent / "data" / "premove"
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
STORESCU = shutil.which("storescu")
NODE_AE, CALLER = "CERVSPINE", "PACS"
OTHER_HOST = "127.0.0.2"  # loopback too: a second address on this machine
CALLERS = ({"ae_title": CALLER, "address": "127.0.0.1/32"}, {"ae_title": "MODALITY", "address": OTHER_HOST})
IDLE_S = 1.0


def wait_for(check, timeout: float = 180.0, what: str = "condition", every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def send(port: int, files, caller: str = CALLER, called: str = NODE_AE) -> int:
    from cervspine.dicom.sender import store_files
    from cervspine.dicom.settings import Destination

    return store_files(Destination("127.0.0.1", port, called), sorted(files), caller)


def study_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def results_in(pacs, study_uid: str, modality: str) -> list[str]:
    return pacs.find("Instance", {"StudyInstanceUID": study_uid, "Modality": modality})


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=10) as r:
        return json.loads(r.read())


def page(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def make_study(folder: Path, seed: int, uid: str, n: int = 16, **headers) -> Path:
    from cervspine.synthetic import write_study

    write_study(folder, seed=seed, size=32, n_slices=n, uid=uid)
    if headers:
        for f in study_files(folder):
            ds = pydicom.dcmread(f)
            for k, v in headers.items():
                setattr(ds, k, v)
            ds.save_as(f, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("studies")
    out = {
        "A": make_study(root / "A", 11, "1.2.826.0.1.3680043.990.1"),
        "B": make_study(root / "B", 12, "1.2.826.0.1.3680043.990.2"),
        "P": make_study(
            root / "P",
            13,
            "1.2.826.0.1.3680043.990.3",
            PatientName="<script>document.title='pwned'</script>^Evil",
            PatientID="PID-<b>77</b>",
        ),
    }
    broken = make_study(root / "C", 14, "1.2.826.0.1.3680043.990.4", n=8)
    for f in study_files(broken)[::2]:  # two orientations in one series: load_study refuses it, by name
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(f, enforce_file_format=True)
    out["C"] = broken
    mr = make_study(root / "MR", 15, "1.2.826.0.1.3680043.990.5", n=2)
    for f in study_files(mr):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = (
            "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        )
        ds.Modality = "MR"
        ds.save_as(f, enforce_file_format=True)
    out["MR"] = mr
    odd = make_study(root / "odd", 16, "1.2.826.0.1.3680043.990.6", n=1, Modality="<script>alert(1)</script>")
    out["odd"] = odd
    out["D"] = make_study(root / "D", 19, "1.2.826.0.1.3680043.990.9")  # sent twice, then changed
    mixed = make_study(root / "M", 20, "1.2.826.0.1.3680043.990.10", n=8, PatientID="MIXED-1")
    for f in study_files(mixed)[::3]:  # one series, two patients: results would go into someone's record
        ds = pydicom.dcmread(f)
        ds.PatientID = "MIXED-2"
        ds.save_as(f, enforce_file_format=True)
    out["M"] = mixed
    out["E"] = make_study(root / "E", 21, "1.2.826.0.1.3680043.990.11")  # two series, one study
    out["K"] = make_study(root / "K", 17, "1.2.826.0.1.3680043.990.7")  # for the kill tests
    out["K2"] = make_study(root / "K2", 18, "1.2.826.0.1.3680043.990.8")
    return out


@pytest.fixture(scope="module")
def predictor():
    from cervspine.inference import Predictor

    return Predictor.from_checkpoints(PREMOVE / "stage1.ckpt", [PREMOVE / "slice.ckpt"], device="cpu")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    node_port = orthanc.free_port()
    with orthanc.LocalOrthanc(
        tmp_path_factory.mktemp("orthanc"), modalities={"cervspine": (NODE_AE, "127.0.0.1", node_port)}
    ) as server:
        server.node_port = node_port
        yield server


def _settings(spool: Path, dest_port: int, port: int, **kw):
    from cervspine.dicom.settings import Destination, NodeSettings

    base = dict(
        idle_s=IDLE_S, http_port=orthanc.free_port(), synthetic=True, retry_initial_s=0.2, retry_max_s=1.0,
        scoring={"isolate": False},  # the module's predictor, in this process (the killed nodes isolate)
    )  # fmt: skip
    return NodeSettings(
        spool=spool,
        destination=Destination("127.0.0.1", dest_port, "ORTHANC"),
        allowed_callers=CALLERS,
        port=port,
        **{**base, **kw},
    )


@pytest.fixture(scope="module")
def node(pacs, predictor, tmp_path_factory):
    from cervspine.dicom.node import Node
    from cervspine.scoring.thresholds import OperatingThreshold

    settings = _settings(tmp_path_factory.mktemp("spool"), pacs.dicom_port, pacs.node_port)
    running = Node(settings, lambda: predictor, OperatingThreshold(0.05, 0.01, "test rule")).start()
    yield running
    running.stop()


def answered(node, study_uid: str, n: int = 1):
    jobs = [j for j in node.queue.jobs("sent") if j["study_uid"] == study_uid]
    return jobs if len(jobs) >= n else None


def ensure_answered(node, folder: Path) -> tuple[str, dict]:
    """The study's UID and its delivered job, sending it first unless an earlier test did (any order)."""
    uid = str(pydicom.dcmread(study_files(folder)[0]).StudyInstanceUID)
    if not answered(node, uid):
        send(node.scp.port, study_files(folder))
    return uid, wait_for(lambda: answered(node, uid), what=f"study {folder.name} delivered")[0]


def test_a_study_goes_in_and_its_results_come_out_in_the_pacs(node, pacs, studies):
    a = studies["A"]
    for f in study_files(a):  # the PACS holds the CT already, as in a hospital
        pacs.upload(f.read_bytes())
    uid = pydicom.dcmread(study_files(a)[0]).StudyInstanceUID
    assert send(node.scp.port, study_files(a)) == 16
    (job,) = wait_for(lambda: answered(node, uid), what="study A delivered")
    (sr_id,) = results_in(pacs, uid, "SR")
    assert len(results_in(pacs, uid, "OT")) == 3  # the key images
    sr_file = node.spool.root / "from_pacs_sr.dcm"
    sr_file.write_bytes(pacs.download(sr_id))
    sr = read_sr(sr_file)
    series = str(pydicom.dcmread(study_files(a)[0]).SeriesInstanceUID)
    record = json.loads(node.spool.record_path(str(uid), series).read_text())
    np.testing.assert_allclose(sr.probabilities, [record[t] for t in TARGETS], rtol=1e-12, atol=0)
    assert [level["statement"] for level in record["levels"]] == [sr.labels[t] for t in TARGETS]
    (seg_id,) = results_in(pacs, uid, "SEG")  # the levels stage 1 found, one segment each
    seg = pydicom.dcmread(io.BytesIO(pacs.download(seg_id)), stop_before_pixels=True)
    labels = [str(s.SegmentLabel).split(":")[0] for s in seg.SegmentSequence]
    assert labels and set(labels) <= {e["vertebra"] for e in record["vertebra_extents"] if e["present"]}
    assert (
        sr.suspected == record["operating_point"]["fracture_suspected"] and job["sr_uid"] == record["sr_uid"]
    )
    assert {e[2] for e in sr.evidence} == {str(pydicom.dcmread(f).SOPInstanceUID) for f in study_files(a)}
    (orthanc_study,) = pacs.find("Study", {"StudyInstanceUID": uid})
    modalities = sorted(
        pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"]
        for s in pacs.get(f"/studies/{orthanc_study}")["Series"]
    )
    # one study: the images and their results side by side, each key image in a series of its own
    assert modalities == ["CT", "OT", "OT", "OT", "SEG", "SR"]
    snap = status(node.settings.http_port)
    assert [j["state"] for j in snap["jobs"] if j["study_uid"] == uid] == ["sent"]
    html = page(node.settings.http_port)
    assert f'href="/reports/{job["job"]}/report.html"' in html and "SYNTHETIC DATA" in html
    assert uid in page(node.settings.http_port, f"/reports/{job['job']}/report.html")


def test_several_associations_at_once_and_bad_series_are_named_refusals(node, pacs, studies):
    """B by dcmtk's storescu while a broken series, an MR series and a CT instance whose Modality is not
    CT come in by pynetdicom: B is answered; each of the others is a named refusal; the node goes on."""
    b_uid = pydicom.dcmread(study_files(studies["B"])[0]).StudyInstanceUID
    errors: list[Exception] = []

    def other() -> None:
        try:
            send(node.scp.port, study_files(studies["C"]))
            for name in ("MR", "odd"):
                with pytest.raises(Exception, match="did not store|rejected|aborted|no presentation context"):
                    send(node.scp.port, study_files(studies[name]))
        except Exception as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    if STORESCU:
        cmd = [STORESCU, "-aet", CALLER, "-aec", NODE_AE, "127.0.0.1", str(node.scp.port)]
        done = subprocess.run([*cmd, *map(str, study_files(studies["B"]))], capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    else:
        send(node.scp.port, study_files(studies["B"]))
    t.join()
    assert not errors, errors
    wait_for(lambda: answered(node, b_uid), what="study B delivered")
    c_series = str(pydicom.dcmread(study_files(studies["C"])[0]).SeriesInstanceUID)
    failed = wait_for(
        lambda: [s for s in node.queue.series("failed") if s["series_uid"] == c_series], what="C"
    )
    assert "StudyReadError" in failed[0]["reason"] and "ImageOrientationPatient" in failed[0]["reason"]
    assert str(node.spool.root) not in failed[0]["reason"]  # paths in reasons are spool-relative
    node.scp.events.flush(force=True)
    kinds = {(e["kind"], e["detail"].split(":")[0]) for e in node.queue.events()}
    assert ("context refused", "offers MR Image Storage") in kinds
    assert any(k == "instance refused" and "Modality" in e["detail"] for k, e in
               ((e["kind"], e) for e in node.queue.events()))  # fmt: skip
    html = page(node.settings.http_port)
    assert (
        "ImageOrientationPatient" in html
        and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        and "<script>alert" not in html
    )
    assert not results_in(pacs, pydicom.dcmread(study_files(studies["C"])[0]).StudyInstanceUID, "SR")


def _store_from(host: str, port: int, files, caller: str = CALLER):
    """C-STORE from the local address ``host``: (established?, rejected?, statuses of the stores)."""
    from pynetdicom import AE

    ae = AE(ae_title=caller)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, bind_address=(host, 0))
    if not assoc.is_established:
        return False, assoc.is_rejected, []
    try:
        return True, False, [int(assoc.send_c_store(f).Status) for f in files]
    finally:
        assoc.release()


def test_callers_are_proven_by_ae_title_and_address(node, studies):
    """The PACS's AE title from another address is rejected before any data; an address no caller has is
    closed unread; unknown AE titles and a wrong called AE title are rejected."""
    from cervspine.dicom.sender import SendError

    before = len(node.spool.series_on_disk())
    files = study_files(studies["A"])[:2]
    assert _store_from(OTHER_HOST, node.scp.port, files) == (False, True, [])  # PACS from 127.0.0.2
    established, rejected, _ = _store_from("127.0.0.3", node.scp.port, files)
    assert not established and not rejected  # closed before the A-ASSOCIATE-RQ was even read
    for caller, called in (("INTRUDER", NODE_AE), (CALLER, "SOMEONE")):
        with pytest.raises(SendError, match="rejected"):
            send(node.scp.port, files[:1], caller=caller, called=called)
    node.scp.events.flush(force=True)  # refusals from one address are folded within a minute
    refused = [e for e in node.queue.events() if e["kind"] == "association refused"]
    assert any(e["subject"] == "INTRUDER" and "allowed_callers" in e["detail"] for e in refused)
    assert any(e["subject"] == CALLER and f"not allowed from {OTHER_HOST}" in e["detail"] for e in refused)
    assert any("called AE title 'SOMEONE'" in e["detail"] for e in refused)
    closed = [e for e in node.queue.events() if e["kind"] == "connection refused"]
    assert any(e["subject"] == "127.0.0.3" and "closed unread" in e["detail"] for e in closed)
    assert len(node.spool.series_on_disk()) == before
    assert f"{CALLER}@127.0.0.1/32" in page(node.settings.http_port)


def test_a_series_that_mixes_patients_is_quarantined_by_name(node, studies, tmp_path):
    files = study_files(studies["M"])
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    send(node.scp.port, files)
    (row,) = wait_for(
        lambda: [s for s in node.queue.series("quarantined") if s["series_uid"] == series], what="M refused"
    )
    assert "PatientID differs" in row["reason"] and "mixed identity" in row["reason"]
    assert "MIXED-" not in row["reason"]  # the IDs are patient data: counted, never named
    assert not [j for j in node.queue.jobs() if j["series_uid"] == series]
    folder = node.spool.sub("quarantine") / series
    assert len(list(folder.glob("*.dcm"))) == len(files) and not node.spool.instances(series)
    assert "PatientID differs" in json.loads((folder / "reason.json").read_text())["reason"]
    assert "PatientID differs" in page(node.settings.http_port) and "Quarantined series" in page(
        node.settings.http_port
    )


def test_each_series_of_a_study_keeps_its_own_record(node, studies, tmp_path):
    """Two series of one study: two answers, two records (the second does not overwrite the first)."""
    files = study_files(studies["E"])
    uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    other = []
    for k, f in enumerate(files):  # a second series of the same study (another reconstruction)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SeriesNumber = f"{ds.SeriesInstanceUID}.2", 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.2"
        other.append(tmp_path / f"{k:03d}.dcm")
        ds.save_as(other[-1], enforce_file_format=True)
    send(node.scp.port, files)
    send(node.scp.port, other)
    jobs = wait_for(lambda: answered(node, uid, 2), what="both series of study E delivered")
    records = sorted((node.spool.sub("studies") / uid).glob("*.json"))
    assert sorted(p.stem for p in records) == sorted(j["series_uid"] for j in jobs)
    assert {json.loads(p.read_text())["sr_uid"] for p in records} == {j["sr_uid"] for j in jobs}


def test_a_study_sent_twice_is_answered_once_and_again_when_it_changed(node, pacs, studies, tmp_path):
    a = studies["D"]
    uid, _ = ensure_answered(node, a)
    n_events = sum(e["kind"] == "already answered" for e in node.queue.events())
    send(node.scp.port, study_files(a))
    wait_for(lambda: sum(e["kind"] == "already answered" for e in node.queue.events()) > n_events, what="dup")
    assert len(results_in(pacs, uid, "SR")) == 1 and len(answered(node, uid)) == 1
    changed = tmp_path / "changed.dcm"  # one instance re-sent with other pixels: a new answer
    ds = pydicom.dcmread(study_files(a)[5])
    ds.PixelData = (ds.pixel_array + 7).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(changed, enforce_file_format=True)
    send(node.scp.port, [changed])
    wait_for(lambda: answered(node, uid, 2), what="the changed study answered again")
    srs = [pydicom.dcmread(_download(pacs, i, tmp_path)) for i in results_in(pacs, uid, "SR")]
    assert len(srs) == 2
    first, second = sorted(srs, key=lambda d: "PredecessorDocumentsSequence" in d)
    ref = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID


def _download(pacs, instance_id: str, folder: Path) -> Path:
    path = folder / f"{instance_id}.dcm"
    path.write_bytes(pacs.download(instance_id))
    return path


def test_patient_names_and_ids_go_into_dicom_outputs_only(node, pacs, studies, tmp_path, caplog):
    p = studies["P"]
    first = pydicom.dcmread(study_files(p)[0])
    uid, name, pid = first.StudyInstanceUID, str(first.PatientName), str(first.PatientID)
    with caplog.at_level(logging.DEBUG):
        send(node.scp.port, study_files(p))
        (job,) = wait_for(lambda: answered(node, uid), what="study P delivered")
    (sr_id,) = results_in(pacs, uid, "SR")
    sr = pydicom.dcmread(_download(pacs, sr_id, tmp_path))
    assert str(sr.PatientName) == name and sr.PatientID == pid  # the DICOM output carries them
    logged = "\n".join(r.getMessage() for r in caplog.records)
    texts = [logged, page(node.settings.http_port), json.dumps(status(node.settings.http_port))]
    texts.append(page(node.settings.http_port, f"/reports/{job['job']}/report.html"))
    texts += [f.read_text() for f in node.spool.root.rglob("*.json")]
    texts.append("\n".join(str(f) for f in node.spool.root.rglob("*")))
    for text in texts:
        assert "Evil" not in text and "PID-" not in text and "pwned" not in text
    if CHROMIUM.is_file():  # the page as a browser sees it: nothing injected ran
        dom = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
             f"http://127.0.0.1:{node.settings.http_port}/"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert "<title>cervspine node CERVSPINE</title>" in dom.stdout and "pwned" not in dom.stdout
        assert f"/reports/{job['job']}/report.html" in dom.stdout and "Refused series" in dom.stdout


@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="no /usr/bin/chromium (Debian package 'chromium'; make browser)"
)
def test_the_status_page_and_its_report_links_render_in_chromium(node, studies, tmp_path):
    _, job = ensure_answered(node, studies["A"])
    url = f"http://127.0.0.1:{node.settings.http_port}/reports/{job['job']}/report.html"
    dom = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0 and 'data-images-ok="true"' in dom.stdout, dom.stderr[-2000:]
    assert "SYNTHETIC DATA" in dom.stdout and (
        "fracture suspected" in dom.stdout or "not suspected" in dom.stdout
    )


def test_results_wait_in_the_outbox_until_the_destination_takes_them(predictor, studies, tmp_path):
    from cervspine.dicom.node import Node

    dest_port = orthanc.free_port()
    settings = _settings(tmp_path / "spool", dest_port, orthanc.free_port(), http_port=None)
    node = Node(settings, lambda: predictor).start()
    try:
        uid = pydicom.dcmread(study_files(studies["A"])[0]).StudyInstanceUID
        send(node.scp.port, study_files(studies["A"]))
        job = wait_for(lambda: [j for j in node.queue.jobs("sending") if j["attempts"] >= 2], what="retries")[
            0
        ]
        assert (
            "association" in job["last_error"]
            and (node.spool.sub("outbox") / job["job"] / "sr.dcm").is_file()
        )
        with orthanc.LocalOrthanc(tmp_path / "late_pacs", dicom_port=dest_port) as late:
            wait_for(lambda: answered(node, uid), what="delivery once the destination is up")
            assert len(results_in(late, uid, "SR")) == 1 and len(results_in(late, uid, "OT")) == 3
        assert (node.spool.sub("sent") / job["job"] / "sr.dcm").is_file()
        sr = read_sr(node.spool.sub("sent") / job["job"] / "sr.dcm")
        assert set(sr.suspected.values()) == {None}  # no operating point given: probabilities only
    finally:
        node.stop()


# ----------------------------------------------------------------------------- the real process, killed


class NodeProcess:
    """``python -m cervspine.serve`` on the premove models, killed by its own crash hook or by a test."""

    def __init__(self, tmp: Path, pacs, port: int):
        self.tmp, self.port, self.spool = tmp, port, tmp / "spool"
        self.args = [
            sys.executable, "-m", "cervspine.serve", f"spool={self.spool}", f"port={port}",
            f"ae_title={NODE_AE}", f"allowed_callers=[{{ae_title:{CALLER},address:127.0.0.1}}]",
            "destination.host=127.0.0.1",
            f"destination.port={pacs.dicom_port}", "destination.ae_title=ORTHANC", "idle_s=3",
            "http_port=null", f"ckpt.stage1={PREMOVE / 'stage1.ckpt'}",
            f"ckpt.stage2=[{PREMOVE / 'slice.ckpt'}]",
            "device=cpu", "synthetic=true", "retry.initial_s=0.2", "retry.max_s=1", "report_threshold=0.05",
            f"hydra.run.dir={tmp / 'hydra'}",
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self, crash_at: str = "") -> NodeProcess:
        from cervspine.dicom.faults import CRASH_ENV

        self.runs += 1
        env = {**os.environ, CRASH_ENV: crash_at, "PYTHONWARNINGS": "ignore"}
        log = open(self.tmp / f"node{self.runs}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._echo, timeout=120, what="the node to listen", every=0.2)
        return self

    def _echo(self) -> bool:
        from pynetdicom import AE

        if self.proc.poll() is not None:
            raise AssertionError(f"node exited {self.proc.returncode}: {self.log_tail()}")
        ae = AE(ae_title=CALLER)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        ok = assoc.is_established
        if ok:
            assoc.release()
        return ok

    def killed(self, timeout: float = 180) -> int:
        return self.proc.wait(timeout=timeout)

    def log_tail(self) -> str:
        return (self.tmp / f"node{self.runs}.log").read_text(errors="replace")[-1500:]


def test_a_node_killed_mid_association_and_mid_send_finishes_the_study_once(pacs, studies, tmp_path):
    """SIGKILL after the 10th instance, then (the study sent again in full) after the first result
    object was delivered: the third start sends the rest — the same objects, once each."""
    from cervspine.dicom.sender import SendError

    node = NodeProcess(tmp_path, pacs, orthanc.free_port())
    files = study_files(studies["K"])
    series, uid = (str(pydicom.dcmread(files[0]).get(k)) for k in ("SeriesInstanceUID", "StudyInstanceUID"))

    node.start("stored:10")
    with pytest.raises(SendError):
        send(node.port, files)
    assert node.killed() == -signal.SIGKILL
    assert len(list((node.spool / "incoming" / series).glob("*.dcm"))) == 10  # the acknowledged 9, and one

    node.start("sent:1")
    send(node.port, files)  # the PACS sends the study again, as it would after a failed association
    assert node.killed() == -signal.SIGKILL
    (job,) = [p for p in (node.spool / "outbox").iterdir()]  # one answer, to the whole study
    manifest = json.loads((job / "manifest.json").read_text())
    assert manifest["n_instances"] == len(files)

    node.start()
    wait_for(lambda: (node.spool / "sent" / job.name / "sr.dcm").is_file(), what="delivery after restart")
    node.proc.send_signal(signal.SIGTERM)
    assert node.killed() == 0
    assert [p.name for p in (node.spool / "sent").iterdir()] == [job.name] and not any(
        (node.spool / "outbox").iterdir()
    )
    sr_ids = [i for i in results_in(pacs, uid, "SR") if pacs.get(f"/instances/{i}")["MainDicomTags"][
        "SOPInstanceUID"] == manifest["sr_uid"]]  # fmt: skip
    assert len(sr_ids) == 1
    assert len(results_in(pacs, uid, "SR")) == 1 and len(results_in(pacs, uid, "OT")) == 3  # none twice


@pytest.mark.slow
def test_a_node_killed_mid_inference_scores_the_study_after_restart(pacs, studies, tmp_path):
    node = NodeProcess(tmp_path, pacs, orthanc.free_port())
    files = study_files(studies["K2"])
    node.start("scoring:1")
    send(node.port, files)
    assert node.killed() == -signal.SIGKILL
    assert not list((node.spool / "outbox").iterdir()) and list((node.spool / "work").iterdir())
    node.start()
    wait_for(lambda: list((node.spool / "sent").iterdir()), what="the study answered after restart")
    node.proc.send_signal(signal.SIGTERM)
    assert node.killed() == 0
    assert not list((node.spool / "work").iterdir())
    assert len(list((node.spool / "sent").iterdir())) == 1
