"""Who may send to the node: each allowed caller is an AE title *and* the network it sends from
(``{ae_title: PACS, address: 10.0.0.5/32}``; an address is an IP, a CIDR network or a host name resolved
at start-up). A connection from an address no caller has is closed before a byte is read; an association
whose calling AE title is not allowed from its address is rejected before any data is accepted.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NEW_FORM = "{ae_title: PACS, address: 10.0.0.5/32}"


def peer_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a peer as the socket gave it (an IPv4-mapped IPv6 address as IPv4); None if not an IP."""
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def networks_of(address: str, what: str) -> tuple[Network, ...]:
    """An IP, a CIDR network or a host name (every address it resolves to) as networks."""
    text = str(address or "").strip()
    if not text:
        raise ValueError(f"{what}: no address (an IP, a CIDR network such as 10.0.0.0/24, or a host name)")
    try:
        return (ipaddress.ip_network(text, strict=False),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(text, None, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise ValueError(f"{what}: {text!r} is neither an IP, a CIDR network nor a host name ({e})") from e
    ips = {peer_ip(info[4][0]) for info in infos}
    return tuple(sorted((ipaddress.ip_network(ip) for ip in ips if ip is not None), key=str))


@dataclass(frozen=True)
class AllowedCaller:
    """One caller: its calling AE title and the address (IP, CIDR or host name) it sends from."""

    ae_title: str
    address: str
    networks: tuple[Network, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        from cervspine.dicom.settings import check_ae_title

        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "allowed_callers.ae_title"))
        what = f"allowed_callers ({self.ae_title})"
        object.__setattr__(self, "networks", networks_of(self.address, what))

    def from_address(self, host: str) -> bool:
        ip = peer_ip(host)
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def admits(self, ae_title: str, host: str) -> bool:
        return str(ae_title).strip() == self.ae_title and self.from_address(host)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.address}"

    @classmethod
    def parse(cls, entry: Any) -> AllowedCaller:
        """An entry of ``allowed_callers``: a mapping with ``ae_title`` and ``address``."""
        if isinstance(entry, AllowedCaller):
            return entry
        if isinstance(entry, str):
            raise ValueError(
                f"allowed_callers: {entry!r} is an AE title alone; a caller is proven by its AE title AND "
                f"its address: write each as {NEW_FORM} (in conf/serve.yaml or on the command line: "
                f"'allowed_callers=[{{ae_title:{entry.strip() or 'PACS'},address:10.0.0.5/32}}]')"
            )
        if not hasattr(entry, "get") or set(entry) - {"ae_title", "address"}:
            raise ValueError(f"allowed_callers: {entry!r} is not of the form {NEW_FORM}")
        if not entry.get("ae_title") or not entry.get("address"):
            raise ValueError(f"allowed_callers: {dict(entry)!r} needs both ae_title and address ({NEW_FORM})")
        return cls(str(entry["ae_title"]), str(entry["address"]))


class CallerList:
    """The allowed callers, asked by address (at connect) and by (AE title, address) (at association)."""

    def __init__(self, callers: tuple[AllowedCaller, ...]):
        self.callers = tuple(callers)

    def knows_address(self, host: str) -> bool:
        return any(c.from_address(host) for c in self.callers)

    def admits(self, ae_title: str, host: str) -> bool:
        return any(c.admits(ae_title, host) for c in self.callers)

    def why_refused(self, ae_title: str, host: str) -> str:
        """Why (``ae_title``, ``host``) is not an allowed caller (for the log and the status page)."""
        titles = {c.ae_title for c in self.callers}
        if str(ae_title).strip() not in titles:
            return f"calling AE title {ae_title!r} is not in allowed_callers"
        return f"calling AE title {ae_title!r} is not allowed from {host}"
