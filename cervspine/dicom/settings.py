"""The DICOM node's settings (``conf/serve.yaml`` instantiates :class:`NodeSettings`); bad values are
named errors at start-up, not surprises later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cervspine.dicom.callers import NEW_FORM, AllowedCaller, CallerList
from cervspine.dicom.tls import TlsSettings


def check_ae_title(value: str, what: str) -> str:
    """An AE title: 1–16 ASCII characters, no backslash or control characters, not all spaces."""
    text = str(value)
    if not 0 < len(text.strip()) <= 16 or not text.isascii() or "\\" in text or not text.isprintable():
        raise ValueError(f"{what}: {value!r} is not a DICOM AE title (1-16 ASCII characters, no '\\')")
    return text.strip()


def check_port(value: int, what: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{what}: {value!r} is not a TCP port")
    return port


@dataclass(frozen=True)
class Destination:
    """Where results go by C-STORE (the PACS)."""

    host: str
    port: int
    ae_title: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "port", check_port(self.port, "destination.port"))
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "destination.ae_title"))
        if not str(self.host):
            raise ValueError("destination.host is empty")


@dataclass(frozen=True)
class Timeouts:
    """DICOM network timeouts in seconds, receiving and sending (None: wait for ever — not advised)."""

    connection_s: float | None = 10.0  # TCP connect to the destination
    acse_s: float | None = 5.0  # association request/answer; short: an idle connection is dropped soon
    dimse_s: float | None = 60.0  # one DIMSE message (e.g. a C-STORE response)
    network_s: float | None = 60.0  # silence on an established association before it is aborted

    def __post_init__(self) -> None:
        for name in ("connection_s", "acse_s", "dimse_s", "network_s"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                raise ValueError(f"timeouts.{name} must be > 0 seconds (or null), got {value!r}")


@dataclass(frozen=True)
class Limits:
    """What may arrive (:mod:`.scp`): an instance over a limit is refused with 0xA700 (out of resources)
    and a named log line; an instance a series cannot do without (over the per-series or per-instance
    limits) also makes its series poison: quarantined when complete, never scored half."""

    instances_per_series: int = 3000  # a CT series of 0.5 mm slices over a whole spine is ~1,500
    instance_mb: float = 64.0  # bytes of one encoded instance (a 512² CT slice is ~0.5 MB)
    pixels_per_slice: int = 4_194_304  # Rows × Columns (2048²; CT is 512² or 1024²)
    spool_gb: float = 200.0  # everything under the spool
    min_free_disk_gb: float = 2.0  # free space the spool's disk keeps; below it every instance is refused

    def __post_init__(self) -> None:
        for name in ("instances_per_series", "instance_mb", "pixels_per_slice", "spool_gb"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"limits.{name} must be > 0, got {getattr(self, name)!r}")
        if float(self.min_free_disk_gb) < 0:
            raise ValueError(f"limits.min_free_disk_gb must be >= 0, got {self.min_free_disk_gb!r}")


@dataclass(frozen=True)
class ScoringSettings:
    """Where and how often a series is scored (:mod:`.isolation`, :mod:`.answer`)."""

    isolate: bool = (
        True  # decode and score in a worker process: a crash or memory bomb kills it, not the node
    )
    memory_mb: int | None = 16384  # the worker's data-memory limit (RLIMIT_DATA, MiB; None: none)
    timeout_s: float = 1800.0  # one series' scoring may take this long before its worker is killed
    attempts: int = 3  # failed or crashed attempts at one series before it is quarantined
    retry_s: float = 10.0  # the wait before the next attempt, doubling per attempt up to retry_max_s
    retry_max_s: float = 600.0

    def __post_init__(self) -> None:
        if int(self.attempts) < 1:
            raise ValueError(f"scoring.attempts must be >= 1, got {self.attempts}")
        if not 0 < float(self.retry_s) <= float(self.retry_max_s) or not float(self.timeout_s) > 0:
            raise ValueError("scoring: need timeout_s > 0 and 0 < retry_s <= retry_max_s")
        if self.memory_mb is not None and int(self.memory_mb) < 256:
            raise ValueError(f"scoring.memory_mb: {self.memory_mb} MiB is too little to load the models")

    def retry_wait(self, attempt: int) -> float:
        return float(min(self.retry_max_s, self.retry_s * 2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class NodeSettings:
    """What a node listens on, whom it accepts, when a series is complete and where results go."""

    spool: Path
    destination: Destination
    allowed_callers: tuple[AllowedCaller, ...]  # (AE title, address) pairs: see :mod:`.callers`
    port: int = 11112
    ae_title: str = "CERVSPINE"
    host: str = "127.0.0.1"  # the address the C-STORE SCP listens on
    idle_s: float = 60.0  # a series is complete when no instance arrived for this long (conf/serve.yaml: why)
    http_port: int | None = 8080  # the status page, on 127.0.0.1 only; None: no page
    status_hosts: tuple[str, ...] = ()  # Host names the page answers besides localhost/127.0.0.1/[::1]
    status_token: str | None = None  # when set, every request to the page needs it
    status_page_size: int = 50
    retry_initial_s: float = 2.0  # first wait before resending to an unreachable destination
    retry_max_s: float = 300.0  # the longest wait between attempts (doubling up to it)
    max_associations: int = 8
    timeouts: Timeouts = Timeouts()
    scoring: ScoringSettings = ScoringSettings()
    limits: Limits = Limits()
    tls: TlsSettings = TlsSettings()
    send_attempts: int = 50  # transient send failures before a job is dead-lettered (about 4 h at 300 s)
    max_connections_per_peer: int = 4  # open connections one address may hold (flooding)
    synthetic: bool | None = None  # None: SYNTHETIC when the models were trained on generated data
    retain_days: float | None = 7.0  # finished series, sent results, reports … purged after (retention.py)
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.allowed_callers, str | dict):
            AllowedCaller.parse(self.allowed_callers)  # a bare AE title: the error names the new form
            raise ValueError(f"allowed_callers must be a list of {NEW_FORM}, got {self.allowed_callers!r}")
        callers = tuple(AllowedCaller.parse(c) for c in (self.allowed_callers or ()))
        if not callers:
            raise ValueError(
                "allowed_callers is empty: name the PACS that may send studies, each as its AE title and "
                "address: [{ae_title: PACS, address: 10.0.0.5/32}]"
            )
        object.__setattr__(self, "allowed_callers", callers)
        object.__setattr__(self, "spool", Path(self.spool))
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "ae_title"))
        object.__setattr__(self, "port", check_port(self.port, "port"))
        if self.http_port is not None:
            object.__setattr__(self, "http_port", check_port(self.http_port, "http_port"))
        object.__setattr__(
            self, "status_hosts", tuple(str(h).strip().lower() for h in self.status_hosts or ())
        )
        if self.status_token is not None and len(str(self.status_token)) < 16:
            raise ValueError("status_token: use at least 16 characters (or none)")
        if int(self.max_connections_per_peer) < 1 or int(self.max_associations) < 1:
            raise ValueError("max_associations and max_connections_per_peer must be >= 1")
        if float(self.idle_s) < 0:
            raise ValueError(f"idle_s must be >= 0, got {self.idle_s}")
        if not 0 < float(self.retry_initial_s) <= float(self.retry_max_s):
            raise ValueError("retry: need 0 < retry_initial_s <= retry_max_s")
        if isinstance(self.destination, dict):
            object.__setattr__(self, "destination", Destination(**self.destination))
        for name, cls in (
            ("timeouts", Timeouts),
            ("scoring", ScoringSettings),
            ("limits", Limits),
            ("tls", TlsSettings),
        ):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls(**getattr(self, name)))
        if int(self.send_attempts) < 1:
            raise ValueError(f"send_attempts must be >= 1, got {self.send_attempts}")

    @property
    def callers(self) -> CallerList:
        return CallerList(self.allowed_callers)

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed sends: doubling from retry_initial_s to retry_max_s."""
        return float(min(self.retry_max_s, self.retry_initial_s * 2 ** max(0, attempts - 1)))
