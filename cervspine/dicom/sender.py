"""Sending DICOM files by C-STORE (pynetdicom SCU): the node's results to the destination, every object
of a job in one association — the job counts as sent only when the destination returned success for
each of them — and, in tests and the benchmark, a CT series to the node.
Objects keep their UIDs, so a job sent again after a crash mid-send is the same objects again, not new
ones (a PACS files them once).

Failures are classified: :class:`PermanentSendError` when sending the same bytes again cannot succeed — a
file damaged in the spool, no presentation context accepted for its SOP class, a 0xA9xx refusal ("data
set does not match SOP class") — else :class:`SendError` (unreachable, rejected, aborted, timed out, out
of resources …: worth another try later)."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

from cervspine.dicom.faults import crash_point
from cervspine.dicom.settings import Destination, Timeouts

log = logging.getLogger(__name__)
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class SendError(RuntimeError):
    """The destination could not be reached, refused the association or did not store an object: transient,
    another try may succeed."""


class PermanentSendError(SendError):
    """Sending these objects again cannot succeed (damaged, refused as such, no presentation context)."""


def read_objects(files: list[Path]) -> list[Dataset]:
    """Every file read whole (a damaged one is a :class:`PermanentSendError` naming it)."""
    out = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            _ = ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID
        except Exception as e:
            raise PermanentSendError(
                f"{path.name}: damaged, not a readable DICOM file ({type(e).__name__}: {e})"
            ) from e
        out.append(ds)
    return out


def _contexts(objects: list[Dataset]) -> dict[str, set[str]]:
    """SOP class → the transfer syntaxes of ``objects`` (from their file meta information)."""
    out: dict[str, set[str]] = {}
    for ds in objects:
        out.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    return out


def _status_error(dest: Destination, name: str, code: int) -> SendError:
    if code < 0:
        return SendError(f"{dest.ae_title} did not store {name}: no response (connection lost or timed out)")
    kind = PermanentSendError if 0xA900 <= code <= 0xA9FF else SendError
    return kind(f"{dest.ae_title} did not store {name}: status 0x{code:04X}")


def store_files(
    dest: Destination,
    files: list[Path],
    calling_ae: str,
    timeouts: Timeouts | None = None,
    ssl_context=None,
) -> int:
    """C-STORE ``files`` to ``dest`` in one association; returns how many were stored (all, or raises
    :class:`SendError`/:class:`PermanentSendError`). Presentation contexts: each file's SOP class in its
    own transfer syntax (and Explicit VR Little Endian)."""
    files = [Path(f) for f in files]
    objects = read_objects(files)
    t = timeouts or Timeouts()
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout, ae.acse_timeout = t.connection_s, t.acse_s
    ae.dimse_timeout, ae.network_timeout = t.dimse_s, t.network_s
    for sop_class, syntaxes in _contexts(objects).items():
        ae.add_requested_context(sop_class, sorted(syntaxes | {EXPLICIT_LE}))
    tls = None if ssl_context is None else (ssl_context, dest.host)
    assoc = ae.associate(dest.host, int(dest.port), ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:  # it answered: none of these, ever
            names = sorted({pydicom.uid.UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts})
            raise PermanentSendError(
                f"{dest.ae_title} accepted no presentation context for {', '.join(names)}"
            )
        state = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(f"association with {dest.ae_title}@{dest.host}:{dest.port} {state}")
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for path, ds in zip(files, objects):
            if str(ds.SOPClassUID) not in accepted:
                raise PermanentSendError(
                    f"{dest.ae_title} accepted no presentation context for {path.name} "
                    f"({pydicom.uid.UID(str(ds.SOPClassUID)).name})"
                )
            try:
                status = assoc.send_c_store(ds)
            except ValueError as e:  # no presentation context for its transfer syntax, or not encodable
                raise PermanentSendError(f"{path.name}: cannot be sent to {dest.ae_title} ({e})") from e
            code = int(getattr(status, "Status", -1)) if status else -1
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:  # success, or a warning: stored
                raise _status_error(dest, path.name, code)
            crash_point("sent")
        return len(files)
    finally:
        if assoc.is_established:
            assoc.release()
