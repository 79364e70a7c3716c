"""Sending DICOM files by C-STORE (pynetdicom SCU): the node's results to the destination, every object
of a job in one association — the job counts as sent only when the destination returned success for
each of them — and, in tests and the benchmark, a CT series to the node.
Objects keep their UIDs, so a job sent again after a crash mid-send is the same objects again, not new
ones (a PACS files them once)."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pynetdicom import AE

from cervspine.dicom.faults import crash_point
from cervspine.dicom.settings import Destination

log = logging.getLogger(__name__)
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class SendError(RuntimeError):
    """The destination could not be reached, refused the association or did not store an object."""


def _contexts(files: list[Path]) -> dict[str, set[str]]:
    """SOP class → the transfer syntaxes of ``files`` (read from their file meta information)."""
    out: dict[str, set[str]] = {}
    for path in files:
        meta = pydicom.filereader.read_file_meta_info(path)
        out.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    return out


def store_files(dest: Destination, files: list[Path], calling_ae: str, timeout_s: float = 30.0) -> int:
    """C-STORE ``files`` to ``dest`` in one association; returns how many were stored (all, or raises
    :class:`SendError`). Presentation contexts: each file's SOP class in its own transfer syntax."""
    files = [Path(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, syntaxes in _contexts(files).items():
        ae.add_requested_context(sop_class, sorted(syntaxes | {EXPLICIT_LE}))
    assoc = ae.associate(dest.host, int(dest.port), ae_title=dest.ae_title)
    if not assoc.is_established:
        state = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(f"association with {dest.ae_title}@{dest.host}:{dest.port} {state}")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:  # success, or a warning: stored
                raise SendError(
                    f"{dest.ae_title} did not store {path.name}: "
                    + (f"status 0x{code:04X}" if code >= 0 else "no response (connection lost)")
                )
            crash_point("sent")
        return len(files)
    finally:
        if assoc.is_established:
            assoc.release()
