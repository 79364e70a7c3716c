"""The SCP's TCP listener (a pynetdicom association server): a connection from an address that no allowed
caller has is closed at once, in the accepting thread, before a byte is read; each peer may hold at most
``per_peer`` connections; a TLS handshake happens in the connection's own thread under a deadline, so a
peer that never finishes one holds nothing but its own thread.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import Counter
from collections.abc import Callable

from pynetdicom.transport import ThreadedAssociationServer

from cervspine.dicom.callers import CallerList

log = logging.getLogger(__name__)


class ConnectionGate:
    """Admits connections by peer address: known to ``callers``, and fewer than ``per_peer`` open."""

    def __init__(self, callers: CallerList, per_peer: int, refused: Callable[[str, str], None]):
        self.callers, self.per_peer, self.refused = callers, int(per_peer), refused
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, host: str) -> bool:
        if not self.callers.knows_address(host):
            self.refused(host, "no allowed caller sends from this address: connection closed unread")
            return False
        with self._lock:
            if self._open[host] >= self.per_peer:
                n = self._open[host]
                full = True
            else:
                self._open[host] += 1
                full = False
        if full:
            self.refused(host, f"{n} connections open from this address already (max_connections_per_peer)")
            return False
        return True

    def release(self, host: str) -> None:
        with self._lock:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]

    def open_connections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._open)


class GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a :class:`ConnectionGate` (``gate``, set before serving) and TLS
    handshakes moved out of the accepting thread (``handshake_s``: their deadline)."""

    gate: ConnectionGate
    handshake_s: float = 5.0

    def get_request(self):
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request, client_address) -> bool:
        try:
            return self.gate.admit(str(client_address[0]))
        except Exception:  # never let a refusal take the accepting thread down
            log.exception("connection gate error (connection refused)")
            return False

    def process_request_thread(self, request, client_address) -> None:
        host = str(client_address[0])
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.handshake_s)
                    request.do_handshake()
                    request.settimeout(None)
                except (OSError, ValueError) as e:
                    self.gate.refused(host, f"TLS handshake failed ({type(e).__name__}: {e})")
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self.gate.release(host)
