"""The DICOM node under load: 20 studies from 4 concurrent senders into ``python -m cervspine.serve``,
results C-STOREd into a real Orthanc, and the node SIGKILLed and restarted in the middle of it.

Measured from outside: seconds from a study's last instance acknowledged to its SR found in Orthanc
(REST, polled every 0.2 s; median and p95), studies per minute from the first instance to the last SR,
the node process's peak RSS. Checked: every study answered, exactly one SR and three key images each in
Orthanc (none lost, none twice). Baselines, measured in the same run: the same studies answered in
process one after another (load, score, report, DICOM results: no network, no queue, no idle wait) for
latency and rate; ``python -m cervspine.predict study=… dicom_out=…`` on one study for the RSS.
Models: the tiny premove checkpoints (tests/data/premove): the figures are about the node, not the
networks.

    python -m experiments.benchmarks.node [--quick]
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from experiments.benchmarks.common import BENCH_DATA, ROOT, Row, _building, _stamp, cli, command, finish

PREMOVE = ROOT / "tests" / "data" / "premove"
IDLE_S = 2.0
UID_ROOT = "1.2.826.0.1.3680043.77"


def studies(n: int, size: int, slices: int) -> list[Path]:
    """``n`` synthetic studies (size², ``slices`` slices), written once under data/bench."""
    path = BENCH_DATA / f"node_studies_{n}x{size}x{slices}"
    if not _stamp(path).is_file():
        from cervspine.synthetic import write_study

        with _building(path) as tmp:
            for i in range(n):
                write_study(
                    tmp / f"s{i:02d}", seed=100 + i, size=size, n_slices=slices, uid=f"{UID_ROOT}.{i + 1}"
                )
    return sorted(p for p in path.iterdir() if p.is_dir())


def baseline(folders: list[Path], tmp: Path) -> list[float]:
    """Seconds per study answered in process (the node's work without network, queue or idle wait)."""
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.dicom.results import results_for_study
    from cervspine.inference import Predictor
    from cervspine.io import load_study
    from cervspine.report.study import write_study_report

    predictor = Predictor.from_checkpoints(PREMOVE / "stage1.ckpt", [PREMOVE / "slice.ckpt"], device="cpu")
    times = []
    for i, folder in enumerate(folders):
        t0 = time.perf_counter()
        study = load_study(folder, workers=0)
        cached = InMemoryStudy(study, CacheParams(image_size=predictor.image_size))
        pred = predictor.predict(cached)
        report = write_study_report(tmp / f"r{i}", cached, pred, predictor, synthetic=True, threshold=None)
        results_for_study(tmp / f"d{i}", study, pred, report, predictor, None, synthetic=True)
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_of(cmd: list[str], env: dict) -> int:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    sampler = RssSampler(proc.pid)
    proc.wait()
    sampler.stop()
    return sampler.peak


class RssSampler:
    """Peak RSS (process + children) of whichever pid it is pointed at, sampled every 0.05 s."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.pid)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


class Node:
    def __init__(self, tmp: Path, port: int, pacs_port: int):
        self.port = port
        self.args = [
            sys.executable, "-m", "cervspine.serve", f"spool={tmp / 'spool'}", f"port={port}",
            "allowed_callers=[" + ",".join(f"{{ae_title:S{i},address:127.0.0.1}}" for i in range(4)) + "]",
            "destination.host=127.0.0.1", f"destination.port={pacs_port}",
            "destination.ae_title=ORTHANC", f"idle_s={IDLE_S}", "http_port=null", "device=cpu",
            f"ckpt.stage1={PREMOVE / 'stage1.ckpt'}", f"ckpt.stage2=[{PREMOVE / 'slice.ckpt'}]",
            "synthetic=true", "retry.initial_s=0.5", "retry.max_s=2", "num_threads=1",
            f"hydra.run.dir={tmp / 'hydra'}",
        ]  # fmt: skip
        self.log = open(tmp / "node.log", "ab")  # noqa: SIM115
        self.proc: subprocess.Popen | None = None
        self.sampler: RssSampler | None = None
        self.peak = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.sampler = RssSampler(self.proc.pid)

    def stop(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)
        self.sampler.stop()
        self.peak = max(self.peak, self.sampler.peak)


def send_with_retry(port: int, folder: Path, caller: str) -> float:
    """C-STORE a study until one association delivered all of it (as a PACS retries); the time then."""
    from cervspine.dicom.sender import SendError, store_files
    from cervspine.dicom.settings import Destination

    files = sorted(folder.glob("*.dcm"))
    while True:
        try:
            store_files(Destination("127.0.0.1", port, "CERVSPINE"), files, caller)
            return time.time()
        except (SendError, OSError, RuntimeError):
            time.sleep(0.5)


def solo_latency(port: int, pacs, folder: Path, uid: str) -> float:
    """One study into the idle node: last instance acknowledged → its SR in Orthanc."""
    t_last = send_with_retry(port, folder, "S0")
    while not pacs.find("Instance", {"StudyInstanceUID": uid, "Modality": "SR"}):
        time.sleep(0.05)
    return time.time() - t_last


def load_run(folders: list[Path], tmp: Path, senders: int, solo: Path) -> dict:
    from cervspine.dicom.orthanc import LocalOrthanc, free_port

    uids = [f"{UID_ROOT}.{int(f.name[1:]) + 1}" for f in folders]
    last: dict[str, float] = {}
    found: dict[str, float] = {}
    with LocalOrthanc(tmp / "orthanc") as pacs:
        node = Node(tmp, free_port(), pacs.dicom_port)
        node.start()
        t_start = time.time()

        def sender(k: int) -> None:
            for i in range(k, len(folders), senders):
                last[uids[i]] = send_with_retry(node.port, folders[i], f"S{k}")

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
        for t in threads:
            t.start()
        killed_at = None
        deadline = time.time() + 1800
        while len(found) < len(uids) and time.time() < deadline:
            for u in uids:
                if u not in found and pacs.find("Instance", {"StudyInstanceUID": u, "Modality": "SR"}):
                    found[u] = time.time()
            if killed_at is None and len(found) >= len(uids) // 2 - 1:  # mid-load: kill -9, restart
                killed_at = time.time()
                node.stop(signal.SIGKILL)
                node.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        alone = solo_latency(node.port, pacs, solo, f"{UID_ROOT}.{int(solo.name[1:]) + 1}")
        node.stop(signal.SIGTERM)
        srs = {u: len(pacs.find("Instance", {"StudyInstanceUID": u, "Modality": "SR"})) for u in uids}
        key = {u: len(pacs.find("Instance", {"StudyInstanceUID": u, "Modality": "OT"})) for u in uids}
    latency = [found[u] - last[u] for u in uids if u in found and u in last]
    return {
        "latency": latency,
        "span_s": max(found.values()) - t_start if found else float("nan"),
        "answered": sum(srs[u] >= 1 for u in uids),
        "duplicated": sum(srs[u] > 1 or key[u] > 3 for u in uids),
        "lost": sum(srs[u] == 0 for u in uids),
        "peak_rss": node.peak,
        "killed_after_s": None if killed_at is None else killed_at - t_start,
        "solo_s": alone,
    }


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    n, senders = (8, 2) if args.quick else (20, 4)
    *folders, solo = studies(n + 1, 64, 40)
    cmd = command("node", args.quick)
    with tempfile.TemporaryDirectory(prefix="bench-node-") as t:
        tmp = Path(t)
        base = baseline(folders[: min(6, n)], tmp / "baseline")
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
        one = [
            sys.executable, "-m", "cervspine.predict", f"study={folders[0]}", f"dicom_out={tmp / 'one'}",
            f"ckpt.stage1={PREMOVE / 'stage1.ckpt'}", f"ckpt.stage2=[{PREMOVE / 'slice.ckpt'}]", "device=cpu",
            "synthetic=true", f"hydra.run.dir={tmp / 'one_run'}",
        ]  # fmt: skip
        predict_rss = peak_rss_of(one, env)
        run = load_run(folders, tmp / "load", senders, solo)
        shutil.copy(tmp / "load" / "node.log", BENCH_DATA / "node_last_run.log")
    lat, per_study = np.asarray(run["latency"]), float(np.median(base))
    rate, base_rate = 60 * run["answered"] / run["span_s"], 60 / per_study
    kill = run["killed_after_s"]
    what = f"{n} studies (64²×40) from {senders} concurrent senders, SIGKILL + restart after {kill:.0f} s"
    lost, twice = run["lost"], run["duplicated"]
    ok = run["lost"] == 0 and run["duplicated"] == 0 and run["answered"] == n
    rows = [
        Row("node", "answered / lost / duplicated", run["answered"], "studies", "", None,
            goal=f"all {n}, none lost or twice", met=ok, command=cmd,
            note=f"{what}; lost {lost}, twice {twice} (Orthanc: 1 SR, 3 key images each)"),
        Row("node", "last instance → SR in Orthanc, median", float(np.median(lat)), "s",
            "in-process answer, one study", per_study, command=cmd, lower_is_better=True,
            note=f"includes the {IDLE_S:g} s idle wait that completes a series and the queue behind the "
            "other senders' studies (one inference worker); the baseline has neither"),
        Row("node", "last instance → SR in Orthanc, p95", float(np.percentile(lat, 95)), "s",
            "in-process answer, one study", per_study, command=cmd, lower_is_better=True,
            note="p95 holds the studies caught by the kill and restart"),
        Row("node", "one study into the idle node: last instance → SR in Orthanc", run["solo_s"], "s",
            "in-process answer, one study", per_study, command=cmd, lower_is_better=True,
            note=f"after the load: {IDLE_S:g} s idle wait, scoring, report, DICOM results, C-STORE"),
        Row("node", "studies per minute (kill + restart included)", rate, "studies/min",
            "in-process, one after another", base_rate, command=cmd),
        Row("node", "node peak RSS (process + children)", run["peak_rss"] / 2**20, "MiB",
            "predict study= dicom_out= (one study)", predict_rss / 2**20, command=cmd, lower_is_better=True),
    ]  # fmt: skip
    finish(
        rows,
        args.json,
        {"latency_s": lat.tolist(), "baseline_s": base, **{k: v for k, v in run.items() if k != "latency"}},
    )


if __name__ == "__main__":
    main()
