"""DICOM over TLS, both ways (issue 29): dcmtk's ``storescu +tls`` sends to the node's SCP with a client
certificate the configured CA signed (mutual TLS); a plain connection and a certificate from another CA
are refused before any data is read; the node sends results to a real Orthanc that speaks TLS only.
Certificates are made here with the ``openssl`` command line (a CA, a server and two client certificates)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from cervspine.dicom import orthanc
from cervspine.dicom.queue import JobQueue
from cervspine.dicom.settings import Destination, NodeSettings
from cervspine.dicom.spool import Spool
from cervspine.dicom.tls import TlsSettings

OPENSSL, STORESCU = shutil.which("openssl"), shutil.which("storescu")
pytestmark = pytest.mark.skipif(not OPENSSL or not STORESCU, reason="needs openssl and dcmtk's storescu")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def _signed(cwd: Path, name: str, ca: str, san: str | None = None) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=cwd)  # fmt: skip
    ext = cwd / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name,
             cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue_ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN={ca}", cwd=d)  # fmt: skip
    _signed(d, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    _signed(d, "client", "ca")
    _signed(d, "rogue", "rogue_ca")
    return d


def _series(tmp_path: Path, n: int = 3) -> list[Path]:
    from cervspine.synthetic import write_study

    write_study(tmp_path / "s", seed=3, size=32, n_slices=n, uid="1.2.826.0.1.3680043.996.1")
    return sorted((tmp_path / "s").glob("*.dcm"))


def _storescu(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess:
    cmd = [
        STORESCU,
        *tls,
        "-aet",
        "PACS",
        "-aec",
        "CERVSPINE",
        "-to",
        "5",
        "-ta",
        "5",
        "127.0.0.1",
        str(port),
    ]
    return subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=60)


def test_storescu_over_tls_with_a_certificate_of_the_ca_is_received_and_others_are_refused(pki, tmp_path):
    from cervspine.dicom.scp import StoreSCP

    tls = TlsSettings(
        receive=True, cert=str(pki / "server.crt"), key=str(pki / "server.key"), ca=str(pki / "ca.crt")
    )
    s = NodeSettings(
        spool=tmp_path / "spool", destination=Destination("127.0.0.1", 9, "ORTHANC"), port=0, http_port=None,
        allowed_callers=({"ae_title": "PACS", "address": "127.0.0.1"},), tls=tls,
    )  # fmt: skip
    spool = Spool(s.spool)
    scp = StoreSCP(s, spool, JobQueue(spool.db))
    scp.start()
    files = _series(tmp_path)
    series = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    try:
        plain = _storescu(scp.port, files[:1])
        rogue = _storescu(scp.port, files[:1], "+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"), "-pw",
                          "+cf", str(pki / "ca.crt"))  # fmt: skip
        assert plain.returncode != 0 and rogue.returncode != 0
        assert not spool.instances(series)  # nothing from either was read, let alone stored
        good = _storescu(scp.port, files, "+tls", str(pki / "client.key"), str(pki / "client.crt"), "-pw",
                         "+cf", str(pki / "ca.crt"))  # fmt: skip
        assert good.returncode == 0, good.stderr[-2000:]
        assert len(spool.instances(series)) == len(files)
        scp.events.flush(force=True)
        refused = [e["detail"] for e in scp.queue.events() if e["kind"] == "connection refused"]
        assert sum("TLS handshake failed" in d for d in refused) >= 1
    finally:
        scp.stop()
        scp.queue.close()


@pytest.mark.skipif(not orthanc.available(), reason="no Orthanc (make dicom-tools)")
def test_results_go_to_a_pacs_that_speaks_tls_only(pki, tmp_path):
    from cervspine.dicom.sender import SendError, store_files

    files = _series(tmp_path, n=2)
    extra = {
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki / "server.crt"),
        "DicomTlsPrivateKey": str(pki / "server.key"), "DicomTlsTrustedCertificates": str(pki / "ca.crt"),
        "DicomTlsRemoteCertificateRequired": True,
    }  # fmt: skip
    with orthanc.LocalOrthanc(tmp_path / "pacs", extra=extra) as pacs:
        dest = Destination("127.0.0.1", pacs.dicom_port, "ORTHANC")
        tls = TlsSettings(
            send=True, ca=str(pki / "ca.crt"), cert=str(pki / "client.crt"), key=str(pki / "client.key")
        )
        assert store_files(dest, files, "CERVSPINE", ssl_context=tls.client_context()) == 2
        deadline = time.time() + 10
        while len(pacs.get("/instances")) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert len(pacs.get("/instances")) == 2
        with pytest.raises(SendError):  # the same PACS without TLS: nothing goes in the clear
            store_files(dest, files, "CERVSPINE")
        other = TlsSettings(send=True, ca=str(pki / "rogue_ca.crt"))  # a CA that did not sign the PACS
        with pytest.raises(SendError):
            store_files(dest, files, "CERVSPINE", ssl_context=other.client_context())


def test_tls_settings_are_checked_at_start(pki):
    with pytest.raises(ValueError, match="tls.receive needs tls.cert and tls.key"):
        TlsSettings(receive=True)
    with pytest.raises(ValueError, match="tls.send needs tls.ca"):
        TlsSettings(send=True)
    with pytest.raises(ValueError, match="is not a file"):
        TlsSettings(ca="/no/such/ca.pem")
