"""The OHIF Viewer (v3, the open web viewer) on a private Orthanc's DICOMweb: what a radiologist sees of
cervspine's results, for the real-viewer test and for a look by hand.

    dist = fetch_ohif(cache_dir)                               # npm pack @ohif/app, checked, unpacked once
    with LocalOrthanc(tmp, dicomweb=True) as pacs, OhifServer(dist, pacs.url) as viewer:
        viewer.study_url(study_uid)                            # open it in a browser

The prebuilt package (``npm pack @ohif/app@OHIF_VERSION``) holds a ready ``dist/``; it is checked against
the pinned integrity hash before it is unpacked. :class:`OhifServer` serves it with OHIF's own single-page
rewrite (every unknown path → ``index.html``), its ``app-config.js`` replaced by one whose only data
source is the Orthanc behind ``/dicom-web`` (a proxy on the same origin: Orthanc sends no CORS headers).
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import shutil
import subprocess
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
OHIF_INTEGRITY = (
    "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
)
"""npm's integrity of ``@ohif/app@3.13.2`` (its tarball's SHA-512), pinned: another file is refused."""
DICOMWEB_ROOT = "/dicom-web"

APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showLoadingIndicator: true,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'cervspine Orthanc',
        name: 'orthanc',
        wadoUriRoot: '%(root)s',
        qidoRoot: '%(root)s',
        wadoRoot: '%(root)s',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


def npm_integrity(path: str | Path) -> str:
    """npm's ``integrity`` string of a file: ``sha512-`` + the base64 of its SHA-512."""
    digest = hashlib.sha512(Path(path).read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch_ohif(cache_dir: str | Path, version: str = OHIF_VERSION, integrity: str = OHIF_INTEGRITY) -> Path:
    """The viewer's ``dist/`` under ``cache_dir/ohif-<version>/``: fetched with ``npm pack`` the first time,
    checked against ``integrity`` and unpacked atomically (a half-unpacked folder is never used)."""
    home = Path(cache_dir) / f"ohif-{version}"
    dist = home / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not installed: it fetches the OHIF Viewer (Debian package 'npm')")
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=f".ohif-{version}.") as tmp:
        done = subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{version}", "--json", "--silent"],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {OHIF_PACKAGE}@{version} failed: {done.stderr.strip()[-500:]}")
        tarball = Path(tmp) / json.loads(done.stdout)[0]["filename"]
        got = npm_integrity(tarball)
        if got != integrity:
            raise RuntimeError(f"{tarball.name}: integrity {got} is not the pinned {integrity}: refused")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarball) as tar:
            tar.extractall(unpacked, filter="data")
        if not (unpacked / "package" / "dist" / "index.html").is_file():
            raise RuntimeError(f"{tarball.name}: no dist/index.html in the package")
        shutil.rmtree(home, ignore_errors=True)
        (unpacked / "package").rename(home)
    return dist


class _Handler(BaseHTTPRequestHandler):
    server: _OhifHttpServer

    def log_message(self, *args) -> None:  # quiet: the test reads the browser's console instead
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.startswith(DICOMWEB_ROOT + "/") or self.path == DICOMWEB_ROOT:
            self._proxy()
        else:
            self._static()

    def _static(self) -> None:
        name = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/")
        if name == "app-config.js":
            self._send(200, self.server.app_config.encode(), "application/javascript")
            return
        path = (self.server.dist / name).resolve()
        if not path.is_relative_to(self.server.dist) or not path.is_file():
            path = self.server.dist / "index.html"  # the single-page app's own rewrite (serve.json)
        kind = "application/wasm" if path.suffix == ".wasm" else mimetypes.guess_type(path.name)[0]
        self._send(200, path.read_bytes(), kind or "application/octet-stream")

    def _proxy(self) -> None:
        req = urllib.request.Request(self.server.orthanc + self.path, method="GET")
        for header in ("Accept", "Range"):
            if self.headers.get(header):
                req.add_header(header, self.headers[header])
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                self._send(r.status, r.read(), r.headers.get("Content-Type"))
        except urllib.error.HTTPError as e:
            self._send(e.code, e.read(), e.headers.get("Content-Type"))

    def _send(self, status: int, body: bytes, kind: str | None) -> None:
        self.send_response(status)
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class _OhifHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dist: Path, orthanc: str):
        super().__init__(address, _Handler)
        self.dist, self.orthanc = dist.resolve(), orthanc.rstrip("/")
        self.app_config = APP_CONFIG % {"root": DICOMWEB_ROOT}


class OhifServer:
    """The viewer's ``dist/`` and a proxy to ``orthanc_url``'s DICOMweb, on a free localhost port."""

    def __init__(self, dist: str | Path, orthanc_url: str, port: int = 0):
        self.dist, self.orthanc_url, self.port = Path(dist), orthanc_url, port
        self._server: _OhifHttpServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def study_url(self, study_uid: str) -> str:
        """The viewer (OHIF's basic ``viewer`` mode) opened on one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def start(self) -> OhifServer:
        self._server = _OhifHttpServer(("127.0.0.1", self.port), self.dist, self.orthanc_url)
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, name="ohif-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
