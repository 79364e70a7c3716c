"""A private Orthanc (the Debian package ``orthanc``) on free localhost ports in a folder of its own: the
real PACS the node's tests, its benchmark and the README's walk-through send results to.

    with LocalOrthanc(tmp, modalities={"cervspine": ("CERVSPINE", "127.0.0.1", 11112)}) as pacs:
        pacs.find("Instance", {"Modality": "SR"})      # REST POST /tools/find
        pacs.download(orthanc_id)                        # REST GET /instances/{id}/file
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available(dicomweb: bool = False) -> bool:
    """Whether Orthanc (and, with ``dicomweb``, its DICOMweb plugin) is installed."""
    return Path(ORTHANC).is_file() and (not dicomweb or DICOMWEB_PLUGIN.is_file())


class LocalOrthanc:
    """Start ``Orthanc config.json`` (storage and index in ``folder``); stop it on exit."""

    def __init__(
        self,
        folder: str | Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicom_port: int | None = None,
        http_port: int | None = None,
        dicomweb: bool = False,
        extra: dict[str, Any] | None = None,
    ):
        self.folder = Path(folder)
        self.extra = dict(extra or {})  # more configuration (e.g. DicomTlsEnabled and its certificates)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})
        self.dicomweb = dicomweb  # QIDO-RS / WADO-RS under /dicom-web/ (what web viewers read)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "cervspine-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StableAge": 1,
            **self.extra,
        }

    def start(self, timeout_s: float = 30.0) -> LocalOrthanc:
        if not available():
            raise FileNotFoundError(f"{ORTHANC}: no Orthanc (Debian package 'orthanc'; make dicom-tools)")
        if self.dicomweb and not available(dicomweb=True):
            raise FileNotFoundError(f"{DICOMWEB_PLUGIN}: no DICOMweb plugin (Debian 'orthanc-dicomweb')")
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 (the process keeps it open)
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited ({self.proc.returncode}); see {self.folder / 'orthanc.log'}"
                )
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer on {self.url} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST

    def _request(self, method: str, path: str, body: bytes | None = None, kind: str = "application/json"):
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", kind)
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()

    def get(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def find(self, level: str, query: dict[str, str], expand: bool = False) -> list:
        """``POST /tools/find``: Orthanc IDs (or expanded records) of the matching resources."""
        body = json.dumps({"Level": level, "Query": query, "Expand": expand}).encode()
        return json.loads(self._request("POST", "/tools/find", body))

    def download(self, instance_id: str) -> bytes:
        """``GET /instances/{id}/file``: the stored DICOM file."""
        return self._request("GET", f"/instances/{instance_id}/file")

    def upload(self, data: bytes) -> dict[str, Any]:
        """``POST /instances``: store a DICOM file (as a modality would)."""
        return json.loads(self._request("POST", "/instances", data, "application/dicom"))
