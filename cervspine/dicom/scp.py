"""The node's C-STORE SCP (pynetdicom): accepts CT Image Storage, in the transfer syntaxes
:func:`cervspine.io.load_study` decodes, from the allowed calling AE titles only, and Verification
(C-ECHO). Callers are proven by AE title *and* address (:mod:`.callers`): an unknown address is closed
unread by the listener (:mod:`.listener`), a known AE title from another address is rejected when it asks
for an association. Each instance is written durably to the spool *before* the success status goes back;
refused connections, associations, presentation contexts and instances are recorded as events (the status
page shows them).
"""

from __future__ import annotations

import logging
import threading

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from cervspine.dicom.events import EventLimiter
from cervspine.dicom.faults import crash_point
from cervspine.dicom.files import is_uid
from cervspine.dicom.listener import ConnectionGate, GatedServer
from cervspine.dicom.queue import JobQueue
from cervspine.dicom.settings import NodeSettings
from cervspine.dicom.source import CT_IMAGE_STORAGE
from cervspine.dicom.spool import Spool, SpoolMeter

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (RSNA's compressed files)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
)
REFUSED = 0xA900  # "data set does not match SOP class": not a CT instance we can file
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


class StoreSCP:
    """Receives instances into the spool and the queue; :meth:`start` listens, :meth:`stop` closes."""

    def __init__(self, settings: NodeSettings, spool: Spool, queue: JobQueue):
        self.settings, self.spool, self.queue = settings, spool, queue
        self.events = EventLimiter(queue)
        self.meter = SpoolMeter(spool.root)
        self.server = None
        self.listener_thread: threading.Thread | None = None
        self._open: dict[int, set[str]] = {}  # association → the series it stored into
        self._open_lock = threading.Lock()

    def busy_series(self) -> set[str]:
        """Series an open association has stored into (not complete while it may send more)."""
        with self._open_lock:
            return set().union(*self._open.values()) if self._open else set()

    def _closed(self, event) -> None:
        with self._open_lock:
            self._open.pop(id(event.assoc), None)

    def _ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = sorted({c.ae_title for c in self.settings.allowed_callers})
        ae.maximum_associations = int(self.settings.max_associations)
        t = self.settings.timeouts
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = t.acse_s, t.dimse_s, t.network_s
        ae.add_supported_context(CTImageStorage, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_RELEASED, self._closed),
            (evt.EVT_ABORTED, self._closed),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]
        address = (self.settings.host, int(self.settings.port))
        server = self._ae().make_server(
            address,
            evt_handlers=handlers,
            server_class=GatedServer,
            ssl_context=self.settings.tls.server_context(),
        )
        server.handshake_s = float(self.settings.timeouts.acse_s or 5.0)
        server.gate = self.gate = ConnectionGate(
            self.settings.callers, self.settings.max_connections_per_peer, self._on_connection_refused
        )
        server.ae._servers.append(server)
        self.listener_thread = threading.Thread(
            target=server.serve_forever, name="cervspine-scp-listener", daemon=True
        )
        self.listener_thread.start()
        self.server = server
        tls = " (TLS)" if self.settings.tls.receive else ""
        log.info("C-STORE SCP %s listening on %s:%s%s", self.settings.ae_title, *address, tls)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server else int(self.settings.port)

    # ------------------------------------------------------------------ events

    def _caller(self, event) -> str:
        requestor = event.assoc.requestor
        title = str(requestor.ae_title or "").strip()
        return title or str(getattr(requestor.primitive, "calling_ae_title", "") or "").strip()

    def _on_connection_refused(self, host: str, why: str) -> None:
        log.warning("connection from %s refused: %s", host, why)
        self.events.event("connection refused", host, why, key=(host,))

    def _on_rejected(self, event) -> None:
        caller, host = self._caller(event), event.assoc.requestor.address
        called = str(getattr(event.assoc.requestor.primitive, "called_ae_title", "") or "").strip()
        if not self.settings.callers.admits(caller, host):
            why = self.settings.callers.why_refused(caller, host)
        elif called != self.settings.ae_title:
            why = f"called AE title {called!r} is not {self.settings.ae_title!r}"
        else:
            why = "refused (too many associations?)"
        log.warning("association from AE %r (%s) rejected: %s", caller, host, why)
        self.events.event("association refused", caller, f"{why} (from {host})", key=(host, called))

    def _on_requested(self, event) -> None:
        """A caller whose AE title is not allowed from its address is rejected here, before negotiation
        (A-ASSOCIATE-RJ, permanent, "calling AE title not recognised"): no data is accepted from it."""
        caller, host = self._caller(event), event.assoc.requestor.address
        if not self.settings.callers.admits(caller, host):
            why = self.settings.callers.why_refused(caller, host)
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()
            log.warning("association from AE %r (%s) rejected: %s", caller, host, why)
            self.events.event("association refused", caller, f"{why} (from {host})", key=(host,))
            return
        self._check_contexts(event)

    def _check_contexts(self, event) -> None:
        """An association that offers neither CT Image Storage nor Verification cannot deliver anything
        here: a named refusal (senders that offer every storage class, as dcmtk's storescu does, and
        include CT are not refusals)."""
        offered = {str(cx.abstract_syntax) for cx in event.assoc.requestor.requested_contexts}
        if offered and not offered & {CT_IMAGE_STORAGE, "1.2.840.10008.1.1"}:
            caller = self._caller(event)
            names = sorted(UID(u).name for u in offered)
            more = " …" if len(names) > 3 else ""
            why = f"offers {', '.join(names[:3])}{more}: this node takes CT Image Storage"
            log.warning("association from AE %r refused: %s", caller, why)
            self.events.event("context refused", caller, why)

    def _refuse(self, caller: str, sop: str, why: str, status: int) -> int:
        log.warning("instance %s from AE %r refused: %s", sop if is_uid(sop) else "(bad UID)", caller, why)
        self.events.event("instance refused", caller, why)
        return status

    def _over_limits(self, series: str, ds, nbytes: int) -> tuple[str, bool] | None:
        """Why this instance may not be stored, and whether its series is poison for it (None: it may)."""
        lim = self.settings.limits
        if nbytes > lim.instance_mb * 2**20:
            return f"limits.instance_mb: {nbytes / 2**20:.1f} MB > {lim.instance_mb:g} MB", True
        try:
            pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        except (TypeError, ValueError):
            pixels = 0
        if pixels > lim.pixels_per_slice:
            return f"limits.pixels_per_slice: Rows x Columns {pixels} > {lim.pixels_per_slice}", True
        n = self.spool.count(series)
        if (
            n >= lim.instances_per_series
            and not (self.spool.series_dir(series) / f"{ds.SOPInstanceUID}.dcm").exists()
        ):
            return f"limits.instances_per_series: {n} instances stored already", True
        if self.meter.bytes + nbytes > lim.spool_gb * 2**30:
            return f"limits.spool_gb: the spool holds {self.meter.bytes / 2**30:.2f} GB", False
        free = self.meter.free_bytes()
        if free - nbytes < lim.min_free_disk_gb * 2**30:
            return f"limits.min_free_disk_gb: {free / 2**30:.2f} GB free on the spool's disk", False
        return None

    def _on_store(self, event) -> int:
        caller = self._caller(event)
        sop = str(event.request.AffectedSOPInstanceUID or "")
        if str(event.request.AffectedSOPClassUID) != CT_IMAGE_STORAGE:
            return self._refuse(
                caller, sop, f"SOP class {event.request.AffectedSOPClassUID} is not CT", REFUSED
            )
        try:
            ds = event.dataset
            study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
            modality = str(ds.get("Modality", ""))
        except Exception as e:  # a dataset pydicom cannot decode
            return self._refuse(
                caller, sop, f"unreadable dataset ({type(e).__name__}: {e})", CANNOT_UNDERSTAND
            )
        uids = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop}
        bad = [k for k, v in uids.items() if not is_uid(v)]
        if bad:
            return self._refuse(caller, sop, f"invalid {', '.join(bad)}", REFUSED)
        if str(ds.get("SOPInstanceUID", "")) != sop:
            return self._refuse(caller, sop, "SOPInstanceUID differs from the C-STORE request's", REFUSED)
        if modality != "CT":
            return self._refuse(caller, sop, f"series {series}: Modality {modality!r} is not CT", REFUSED)
        data = event.encoded_dataset()
        with self._open_lock:  # before storing: the series is not complete while this association lasts
            self._open.setdefault(id(event.assoc), set()).add(series)
        with self.spool.lock(series):  # a purge of this series waits (:mod:`.retention`)
            return self._store(caller, sop, study, series, ds, data)

    def _store(self, caller: str, sop: str, study: str, series: str, ds, data: bytes) -> int:
        over = self._over_limits(series, ds, len(data))
        if over is not None:
            why, poisons = over
            if poisons:
                self.queue.received(series, study, caller)  # the series exists, and is poison
                self.queue.mark_poison(series, f"an instance was refused: {why}")
            return self._refuse(caller, sop, f"series {series}: {why}", OUT_OF_RESOURCES)
        try:
            self.spool.store(series, sop, data)
        except OSError as e:
            log.error("cannot store instance %s (0xA700): %s", sop, e)
            return self._refuse(
                caller, sop, f"cannot be stored ({type(e).__name__}: {e.strerror})", OUT_OF_RESOURCES
            )
        self.meter.add(len(data))
        self.queue.received(series, study, caller)
        crash_point("stored")
        return 0x0000
