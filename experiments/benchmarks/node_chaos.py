"""The DICOM node under attack and faults at once (issue 29): studies from concurrent senders into
``python -m cervspine.serve`` (scoring in its worker process), results into a real Orthanc, while

- the node is SIGKILLed ``kills`` times (when a quarter, a half, three quarters of the studies have a job)
  and started again;
- one series crashes the worker that decodes it (every attempt: the fault hook ``decoding@<series>``);
- one series mixes two patients;
- an address no caller has keeps opening ``flood`` connections (each closed unread, opened again);
- the destination refuses for ``refuse_s`` seconds (its port closed: the PACS starts late).

Checked (:func:`check`): every acknowledged study but those two answered exactly once (one SR, three key
images in Orthanc); those two quarantined with their reasons; no refusal of the real senders; the node's
RSS (process + worker) and its spool under the limits it was given. Measured: seconds from a study's last
instance acknowledged to its SR found in Orthanc (p50/p95) and studies per minute.

``tests/test_serve_chaos.py`` runs 20 small studies (``make test``); ``python -m
experiments.benchmarks.node_chaos`` 200 (``make bench``: RESULTS.md and docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pydicom

ROOT = Path(__file__).resolve().parents[2]
PREMOVE = ROOT / "tests" / "data" / "premove"
FLOOD_HOST = "127.0.0.2"  # loopback, but no allowed caller has it
UID_ROOT = "1.2.826.0.1.3680043.78"


@dataclass
class Chaos:
    """One run's settings (the test's and the benchmark's differ only in size)."""

    n: int = 20
    senders: int = 4
    size: int = 32
    slices: int = 8
    kills: int = 3
    flood: int = 50
    refuse_s: float = 10.0
    idle_s: float = 3.0
    spool_gb: float = 2.0
    worker_memory_mb: int = 4096
    timeout_s: float = 900.0


@dataclass
class Outcome:
    srs: dict[str, int] = field(default_factory=dict)  # study UID → SRs in Orthanc
    key_images: dict[str, int] = field(default_factory=dict)
    series_states: dict[str, tuple[str, str]] = field(default_factory=dict)  # series → (state, reason)
    refusals_of_senders: list[str] = field(default_factory=list)
    flood_refused: int = 0
    flood_held: int = 0
    latency_s: list[float] = field(default_factory=list)
    span_s: float = float("nan")
    peak_rss: int = 0
    peak_spool: int = 0
    kills_done: int = 0
    good: list[str] = field(default_factory=list)
    poison: str = ""
    mixed: str = ""
    timed_out: bool = False


def make_studies(folder: Path, c: Chaos) -> tuple[list[Path], Path, Path]:
    """``c.n`` good studies, one poison and one mixed-patient study (written once into ``folder``)."""
    from cervspine.synthetic import write_study

    def study(i: int) -> Path:
        out = folder / f"s{i:03d}"
        if not out.is_dir():
            write_study(out, seed=200 + i, size=c.size, n_slices=c.slices, uid=f"{UID_ROOT}.{i + 1}")
        return out

    good = [study(i) for i in range(c.n)]
    poison, mixed = study(c.n), study(c.n + 1)
    files = sorted(mixed.glob("*.dcm"))
    if pydicom.dcmread(files[0]).PatientID == pydicom.dcmread(files[1]).PatientID:
        for f in files[::2]:
            ds = pydicom.dcmread(f)
            ds.PatientID = f"{ds.PatientID}-OTHER"
            ds.save_as(f, enforce_file_format=True)
    return good, poison, mixed


def _uids(folder: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _free_port() -> int:
    from cervspine.dicom.orthanc import free_port

    return free_port()


class NodeProcess:
    """``python -m cervspine.serve`` for the run; its RSS (with the worker) and spool size sampled."""

    def __init__(self, tmp: Path, c: Chaos, dest_port: int, poison_series: str):
        self.tmp, self.port, self.http_port = tmp, _free_port(), _free_port()
        self.spool = tmp / "spool"
        callers = ",".join(f"{{ae_title:S{k},address:127.0.0.1}}" for k in range(c.senders))
        self.args = [
            sys.executable, "-m", "cervspine.serve", f"spool={self.spool}", f"port={self.port}",
            f"allowed_callers=[{callers}]", f"max_connections_per_peer={c.senders + 2}",
            "destination.host=127.0.0.1", f"destination.port={dest_port}", "destination.ae_title=ORTHANC",
            f"idle_s={c.idle_s}", f"http_port={self.http_port}", "device=cpu", "synthetic=true",
            "num_threads=1",
            f"ckpt.stage1={PREMOVE / 'stage1.ckpt'}", f"ckpt.stage2=[{PREMOVE / 'slice.ckpt'}]",
            "retry.initial_s=0.5", "retry.max_s=2", "scoring.attempts=2", "scoring.retry_s=0.5",
            f"scoring.memory_mb={c.worker_memory_mb}", f"limits.spool_gb={c.spool_gb}",
            f"hydra.run.dir={tmp / 'hydra'}",
        ]  # fmt: skip
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
                    "CERVSPINE_NODE_CRASH_AT": f"decoding:1@{poison_series}"}  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.peak_rss = self.peak_spool = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        log = open(self.tmp / "node.log", "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if not self._sampler.is_alive():
            self._sampler.start()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self._stop.set()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.proc.pid)
                rss = p.memory_info().rss + sum(ch.memory_info().rss for ch in p.children(recursive=True))
                self.peak_rss = max(self.peak_rss, rss)
            except (psutil.Error, AttributeError):
                pass
            size = 0
            for folder, _, names in os.walk(self.spool):
                for name in names:
                    with contextlib.suppress(OSError):
                        size += os.lstat(os.path.join(folder, name)).st_size
            self.peak_spool = max(self.peak_spool, size)
            self._stop.wait(0.5)

    def jobs(self) -> int:
        return sum(
            len(list((self.spool / box).glob("*")))
            for box in ("outbox", "sent")
            if (self.spool / box).is_dir()
        )


def send_until_stored(port: int, folder: Path, caller: str, stop: threading.Event) -> float:
    """C-STORE a study until one association delivered all of it (as a PACS retries); the time then."""
    from cervspine.dicom.sender import SendError, store_files
    from cervspine.dicom.settings import Destination

    files = sorted(folder.glob("*.dcm"))
    while not stop.is_set():
        try:
            store_files(Destination("127.0.0.1", port, "CERVSPINE"), files, caller)
            return time.time()
        except (SendError, OSError, RuntimeError):
            stop.wait(0.5)
    return float("nan")


def flood(port: int, n: int, stop: threading.Event, counts: dict[str, int]) -> None:
    """Keep ``n`` connections from :data:`FLOOD_HOST` coming: count those closed unread and those held."""
    while not stop.is_set():
        socks = []
        for _ in range(n):
            try:
                socks.append(
                    socket.create_connection(("127.0.0.1", port), timeout=2, source_address=(FLOOD_HOST, 0))
                )
            except OSError:
                break
        for s in socks:
            try:
                s.settimeout(2)
                counts["refused" if s.recv(1) == b"" else "held"] += 1
            except (TimeoutError, OSError):
                counts["held"] += 1
            finally:
                s.close()
        stop.wait(1.0)


def run_chaos(tmp: Path, data: Path, c: Chaos) -> Outcome:
    from cervspine.dicom.orthanc import LocalOrthanc

    tmp.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    good, poison, mixed = make_studies(data, c)
    out = Outcome(good=[_uids(f)[0] for f in good], poison=_uids(poison)[1], mixed=_uids(mixed)[1])
    pacs = LocalOrthanc(tmp / "orthanc", dicom_port=_free_port(), http_port=_free_port())
    node = NodeProcess(tmp, c, pacs.dicom_port, out.poison)
    stop = threading.Event()
    last: dict[str, float] = {}
    found: dict[str, float] = {}
    flood_counts = {"refused": 0, "held": 0}
    node.start()
    t0 = time.time()
    pacs_up = threading.Timer(c.refuse_s, pacs.start)  # until then the destination refuses (port closed)
    pacs_up.start()
    folders = [*good, poison, mixed]

    def sender(k: int) -> None:
        for i in range(k, len(folders), c.senders):
            uid = _uids(folders[i])[0]
            last[uid] = send_until_stored(node.port, folders[i], f"S{k}", stop)

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(c.senders)]
    threads.append(threading.Thread(target=flood, args=(node.port, c.flood, stop, flood_counts), daemon=True))
    for t in threads:
        t.start()
    marks = [max(1, round(c.n * (k + 1) / (c.kills + 1))) for k in range(c.kills)]
    try:
        deadline = t0 + c.timeout_s
        while time.time() < deadline:
            if out.kills_done < c.kills and node.jobs() >= marks[out.kills_done]:
                node.kill()
                out.kills_done += 1
                node.start()
            if pacs.proc is not None:
                for u in out.good:
                    if u not in found and _has_sr(pacs, u):
                        found[u] = time.time()
            states = _series_states(node.spool)
            quarantined = all(states.get(s, ("",))[0] == "quarantined" for s in (out.poison, out.mixed))
            if len(found) == len(out.good) and quarantined and out.kills_done == c.kills:
                break
            time.sleep(0.3)
        else:
            out.timed_out = True
    finally:
        stop.set()
        pacs_up.join()
        for t in threads:
            t.join(timeout=60)
        out.refusals_of_senders = _refusals(node.spool, c.senders)
        node.stop()
        out.series_states = _series_states(node.spool)
        if pacs.proc is not None:
            for u in out.good:
                out.srs[u] = len(pacs.find("Instance", {"StudyInstanceUID": u, "Modality": "SR"}))
                out.key_images[u] = len(pacs.find("Instance", {"StudyInstanceUID": u, "Modality": "OT"}))
        pacs.stop()
    out.latency_s = [found[u] - last[u] for u in out.good if u in found and u in last]
    out.span_s = (max(found.values()) - t0) if found else float("nan")
    out.peak_rss, out.peak_spool = node.peak_rss, node.peak_spool
    out.flood_refused, out.flood_held = flood_counts["refused"], flood_counts["held"]
    return out


def _has_sr(pacs, study_uid: str) -> bool:
    try:
        return bool(pacs.find("Instance", {"StudyInstanceUID": study_uid, "Modality": "SR"}))
    except OSError:  # still starting
        return False


def _db(spool: Path):
    return sqlite3.connect(f"file:{spool / 'queue.sqlite'}?mode=ro", uri=True, timeout=30)


def _series_states(spool: Path) -> dict[str, tuple[str, str]]:
    if not (spool / "queue.sqlite").is_file():
        return {}
    with _db(spool) as db:
        return {r[0]: (r[1], r[2] or "") for r in db.execute("SELECT series_uid, state, reason FROM series")}


def _refusals(spool: Path, senders: int) -> list[str]:
    """Refusal events naming one of the real senders (their AE titles, or their address)."""
    names = {f"S{k}" for k in range(senders)} | {"127.0.0.1"}
    with _db(spool) as db:
        rows = db.execute("SELECT kind, subject, detail FROM events WHERE kind LIKE '%refused%'").fetchall()
    return [f"{k}: {s}: {d}" for k, s, d in rows if s in names and k != "series refused"]


def check(out: Outcome, c: Chaos) -> list[str]:
    """What went wrong (empty: the run met every promise)."""
    problems = []
    if out.timed_out:
        problems.append(f"timed out after {c.timeout_s:.0f} s")
    wrong = {
        u: (out.srs.get(u), out.key_images.get(u))
        for u in out.good
        if (out.srs.get(u), out.key_images.get(u)) != (1, 3)
    }
    if wrong:
        problems.append(f"{len(wrong)} studies not answered exactly once (SRs, key images): {wrong}")
    for series, why in ((out.poison, "WorkerCrash"), (out.mixed, "mixed identity")):
        state, reason = out.series_states.get(series, ("missing", ""))
        if state != "quarantined" or why not in reason:
            problems.append(f"series {series}: {state} ({reason!r}), expected quarantined for {why}")
    if out.refusals_of_senders:
        problems.append(f"real senders refused: {out.refusals_of_senders[:3]}")
    if out.flood_held:
        problems.append(f"{out.flood_held} flood connections were held open")
    if out.kills_done != c.kills:
        problems.append(f"{out.kills_done} of {c.kills} kills")
    if out.peak_spool > c.spool_gb * 2**30:
        problems.append(f"spool peaked at {out.peak_spool / 2**20:.0f} MiB > {c.spool_gb} GiB")
    return problems


def main() -> None:
    import tempfile

    from experiments.benchmarks.common import BENCH_DATA, Row, cli, command, finish

    args = cli(__doc__.splitlines()[0])
    c = (
        Chaos(n=40, senders=4, size=64, slices=40, refuse_s=30, timeout_s=3600)
        if args.quick
        else Chaos(n=200, senders=8, size=64, slices=40, refuse_s=120, timeout_s=4 * 3600)
    )
    data = BENCH_DATA / f"node_chaos_{c.n}x{c.size}x{c.slices}"
    data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-node-chaos-") as t:
        out = run_chaos(Path(t), data, c)
        log = Path(t) / "node.log"
        if log.is_file():
            (BENCH_DATA / "node_chaos_last_run.log").write_bytes(log.read_bytes())
    problems = check(out, c)
    lat = np.asarray(out.latency_s) if out.latency_s else np.asarray([float("nan")])
    cmd = command("node_chaos", args.quick)
    what = (
        f"{c.n} studies ({c.size}x{c.size}x{c.slices}) from {c.senders} senders; {c.kills} SIGKILLs, "
        f"a poison and a mixed series, {c.flood} connections a second from another address, "
        f"the destination refusing "
        f"for {c.refuse_s:.0f} s"
    )
    ok = not problems
    p50, p95 = float(np.median(lat)), float(np.percentile(lat, 95))
    rate = 60 * len(out.latency_s) / out.span_s
    mib = 2**20
    rows = [
        Row("node_chaos", "every promise kept (answered once, quarantined, never refused)", float(ok), "all",
            "", None, goal="issue 29", met=ok, command=cmd, note=f"{what}; problems: {problems or 'none'}"),
        Row("node_chaos", "last instance -> SR in Orthanc, p50", p50, "s", "", None, command=cmd,
            lower_is_better=True, note=f"the {c.refuse_s:.0f} s the destination refused, the kills included"),
        Row("node_chaos", "last instance -> SR in Orthanc, p95", p95, "s", "", None, command=cmd,
            lower_is_better=True),
        Row("node_chaos", "studies per minute", rate, "studies/min", "", None, command=cmd),
        Row("node_chaos", "node peak RSS (process + worker)", out.peak_rss / mib, "MiB", "", None,
            command=cmd, lower_is_better=True, note=f"worker data limit {c.worker_memory_mb} MiB"),
        Row("node_chaos", "spool peak", out.peak_spool / mib, "MiB", "", None, command=cmd,
            lower_is_better=True, note=f"limit {c.spool_gb} GiB"),
    ]  # fmt: skip
    finish(
        rows,
        args.json,
        {"latency_s": out.latency_s, "problems": problems, "flood_refused": out.flood_refused},
    )


if __name__ == "__main__":
    main()
