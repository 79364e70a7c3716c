"""TLS for the node's DICOM traffic (the DICOM TLS profiles' transport: TLS 1.2 or newer, certificates):
receiving (the SCP presents ``cert``/``key``; with ``ca`` every caller must present a certificate that
``ca`` signed — mutual TLS, on top of the AE title and address check) and sending (the destination's
certificate is verified against ``ca`` and its host name; ``cert``/``key`` are presented when given).
A missing or unreadable file is a named error at start-up."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsSettings:
    receive: bool = False  # the SCP speaks TLS only
    send: bool = False  # results go to the destination over TLS only
    cert: str | None = None  # the node's certificate (PEM; a chain may follow it)
    key: str | None = None  # its private key (PEM, unencrypted: keep the file readable by the node only)
    ca: str | None = (
        None  # the CA certificate(s) (PEM) that callers' and the destination's certificates chain to
    )
    require_client_cert: bool = True  # receiving with ``ca``: callers without a certificate are refused

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"tls.{name}: {value} is not a file")
        if self.receive and not (self.cert and self.key):
            raise ValueError("tls.receive needs tls.cert and tls.key (the node's certificate and key)")
        if self.send and not self.ca:
            raise ValueError("tls.send needs tls.ca (to verify the destination's certificate)")
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls.cert and tls.key go together")

    def server_context(self) -> ssl.SSLContext | None:
        """The SCP's context (None: plain TCP)."""
        if not self.receive:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext | None:
        """The context for C-STOREs to the destination (None: plain TCP)."""
        if not self.send:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx
