"""The node's status page on ``http://127.0.0.1:<http_port>/`` (localhost only): the node's threads
(alive, last progress), the queue, refusals, quarantined series and dead-lettered results with their
reasons, done studies with links to their reports, a page at a time (``?page=N``); ``/status.json`` the
same as data; ``/health`` for monitoring (200 ``{"ok": true}`` or 503 with the problems).

Requests whose ``Host`` header is not ``localhost``/``127.0.0.1``/``[::1]`` or a configured name are
refused (403): a web page elsewhere cannot read this one through DNS rebinding. With a token configured
every request needs it (``?token=…`` or ``Authorization: Bearer …``; 401 without).

Only UIDs, AE titles, numbers and reasons are shown — never patient names or IDs — and every value is
HTML-escaped (:func:`cervspine.report.html.esc`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from cervspine.report import html

log = logging.getLogger(__name__)
JOB_RE = re.compile(r"^[0-9.]{1,64}-[0-9a-f]{16}$")
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(html.IMAGES_OK_SCRIPT.encode()).digest()).decode()
CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'"
"""Only the pages' own script may run: anything injected would not (escaping is the first defence)."""


def _when(t: float | None) -> str:
    if not t:
        return ""
    return dt.datetime.fromtimestamp(float(t)).isoformat(sep=" ", timespec="seconds")


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def _query(token: str | None, **more: Any) -> str:
    args = {**({"token": token} if token else {}), **{k: v for k, v in more.items() if v}}
    return f"?{urlencode(args)}" if args else ""


def _link(job: str, token: str | None = None) -> html.Raw:
    return html.Raw(f'<a href="/reports/{html.esc(job)}/report.html{html.esc(_query(token))}">report</a>')


def _pages(snap: dict[str, Any], token: str | None) -> str:
    page, size = int(snap.get("page", 0)), int(snap.get("page_size", 50))
    total = max(1, -(-int(snap.get("largest", 0)) // size))
    links = [f"page {page + 1} of {total}"]
    if page > 0:
        links.insert(0, f'<a href="/{html.esc(_query(token, page=page - 1))}">newer</a>')
    if page + 1 < total:
        links.append(f'<a href="/{html.esc(_query(token, page=page + 1))}">older</a>')
    return f"<p>{' · '.join(links)}</p>"


def render(snap: dict[str, Any], token: str | None = None) -> str:
    """The status page for a :meth:`cervspine.dicom.node.Node.snapshot` (``token``: kept in its links)."""
    node, now = snap["node"], snap["now"]
    counts = snap.get("counts", {})
    series, jobs = snap["series"], snap["jobs"]
    waiting = [s for s in series if s["state"] in ("receiving", "complete", "scoring")]
    failed = [s for s in series if s["state"] == "failed"]
    quarantined = [s for s in series if s["state"] == "quarantined"]
    sending = [j for j in jobs if j["state"] == "sending"]
    dead = [j for j in jobs if j["state"] == "dead"]
    done = [j for j in jobs if j["state"] == "sent"]
    op = node["operating_point"]
    op_text = (
        f"fracture suspected when p &gt; {op['vertebra']:.3f} (C1–C7), p &gt; {op['patient']:.3f} "
        f"(patient); {html.esc(op['rule'])}"
        if op
        else "none: probabilities only (run evaluate to give the run an operating point)"
    )
    head = (
        f"<p>AE title <b>{html.esc(node['ae_title'])}</b>, port {html.esc(node['port'])}; accepts CT Image "
        f"Storage from {html.esc(', '.join(node['allowed_callers']))}; results to "
        f"{html.esc(node['destination'])}; a series is complete after {html.esc(node['idle_s'])} s without "
        f"an instance.</p><p>Operating point: {op_text}.</p>"
        '<p class="note">NOT FOR DIAGNOSTIC USE. Patient names and IDs are never shown here.</p>'
    )
    queue_rows = [
        [
            s["series_uid"],
            s["study_uid"],
            s["state"],
            s["n_stored"],
            f"{now - float(s['last_arrival']):.0f} s",
        ]
        for s in waiting
    ]
    send_rows = [
        [j["study_uid"], j["job"], j["attempts"], j["last_error"] or "", _when(j["next_try"])]
        for j in sending
    ]
    fail_rows = [[s["series_uid"], s["study_uid"], s["reason"] or "", _when(s["updated"])] for s in failed]
    quarantine_rows = [
        [s["series_uid"], s["study_uid"], s["attempts"] or 0, s["reason"] or "", _when(s["updated"])]
        for s in quarantined
    ]
    dead_rows = [
        [j["study_uid"], j["job"], j["attempts"], j["last_error"] or "", _when(j["next_try"])] for j in dead
    ]
    health = snap.get("health") or {"ok": True, "problems": []}
    thread_rows = [
        [
            t["name"],
            ("stalled" if t.get("stalled") else "alive") if t["alive"] else "NOT RUNNING",
            _when(t.get("last_progress")),
            t.get("errors", ""),
            t.get("last_error") or "",
        ]
        for t in snap.get("threads", [])
    ]
    done_rows = [
        [
            j["study_uid"],
            j["series_uid"],
            "" if j["patient_p"] is None else f"{j['patient_p']:.3f}",
            {1: "suspected", 0: "not suspected"}.get(j["suspected"], "—"),
            j["sr_uid"],
            _when(j["sent_at"]),
            _link(j["job"], token),
        ]
        for j in done
    ]
    event_rows = [[_when(e["t"]), e["kind"], e["subject"], e["detail"]] for e in snap["events"]]
    sections = [
        head,
        f"<h2>Health: {'ok' if health['ok'] else 'PROBLEMS'}</h2>"
        + (f"<p>{html.esc('; '.join(health['problems']))}</p>" if health["problems"] else "")
        + html.table(["thread", "state", "last progress", "errors", "last error"], thread_rows),
        f"<h2>Queue ({len(waiting)})</h2>"
        + html.table(["series", "study", "state", "instances stored", "last instance"], queue_rows),
        f"<h2>Waiting for the destination ({len(sending)})</h2>"
        + html.table(["study", "job", "failed attempts", "last error", "next try"], send_rows),
        _pages(snap, token),
        f"<h2>Refused series ({counts.get('failed', len(failed))})</h2>"
        + html.table(["series", "study", "reason", "when"], fail_rows),
        f"<h2>Quarantined series ({counts.get('quarantined', len(quarantined))})</h2>"
        + html.table(["series", "study", "attempts", "reason", "when"], quarantine_rows),
        f"<h2>Dead-lettered results ({counts.get('dead', len(dead))})</h2>"
        + html.table(["study", "job", "attempts", "reason", "when"], dead_rows),
        f"<h2>Done ({counts.get('sent', len(done))})</h2>"
        + html.table(
            ["study", "series", "patient p", "at the operating point", "SR", "delivered", ""], done_rows
        ),
        f"<h2>Refusals and notices ({counts.get('events', len(event_rows))})</h2>"
        + html.table(["when", "what", "AE title / series", "detail"], event_rows),
    ]
    doc = html.page(f"cervspine node {node['ae_title']}", sections, synthetic=bool(node.get("synthetic")))
    return doc.replace("<head>", '<head><meta http-equiv="refresh" content="5">', 1)


class StatusServer:
    """A small threaded HTTP server bound to 127.0.0.1."""

    def __init__(
        self,
        port: int,
        snapshot: Callable[[int], dict[str, Any]],
        reports: Path,
        health: Callable[[], dict[str, Any]] | None = None,
        hosts: tuple[str, ...] = (),
        token: str | None = None,
    ):
        self.snapshot, self.reports = snapshot, Path(reports)
        self.health = health or (lambda: {"ok": True, "problems": []})
        self.hosts = {h.lower() for h in (*LOCAL_HOSTS, *hosts)}
        self.token = token or None
        self.httpd = ThreadingHTTPServer(("127.0.0.1", int(port)), self._handler())
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cervspine-status", daemon=True)
        self._thread.start()
        log.info("status page on http://127.0.0.1:%d/", self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:  # into logging, not stderr
                log.debug("status page: " + fmt, *args)

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Security-Policy", CSP)
                self.end_headers()
                self.wfile.write(body)

            def _host_allowed(self) -> bool:
                host = str(self.headers.get("Host", "")).strip().lower()
                name = host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
                return name in server.hosts

            def _token_ok(self, query: dict[str, list[str]]) -> bool:
                if server.token is None:
                    return True
                given = (query.get("token") or [""])[0]
                auth = str(self.headers.get("Authorization", ""))
                if auth.startswith("Bearer "):
                    given = auth[len("Bearer ") :].strip()
                return hmac.compare_digest(given.encode(), server.token.encode())

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path, _, raw = self.path.partition("?")
                query = parse_qs(raw)
                if not self._host_allowed():
                    log.warning("status page: request for Host %r refused", self.headers.get("Host"))
                    why = b"Host not allowed (add it to status.hosts); this page answers localhost only"
                    return self._send(403, why, "text/plain")
                if not self._token_ok(query):
                    return self._send(
                        401, b"a token is needed: ?token=... or Authorization: Bearer", "text/plain"
                    )
                try:
                    page = max(0, int((query.get("page") or ["0"])[0]))
                except ValueError:
                    page = 0
                if path in ("/", "/index.html"):
                    body = render(server.snapshot(page), server.token).encode()
                    return self._send(200, body, "text/html; charset=utf-8")
                if path == "/health":
                    state = server.health()
                    return self._send(
                        200 if state["ok"] else 503, json.dumps(state).encode(), "application/json"
                    )
                if path == "/status.json":
                    body = json.dumps(server.snapshot(page), default=str).encode()
                    return self._send(200, body, "application/json")
                parts = path.strip("/").split("/")
                if (
                    len(parts) == 3
                    and parts[0] == "reports"
                    and JOB_RE.match(parts[1])
                    and parts[2] == "report.html"
                ):
                    page = server.reports / parts[1] / "report.html"
                    if page.is_file():
                        return self._send(200, page.read_bytes(), "text/html; charset=utf-8")
                return self._send(404, b"not found", "text/plain")

        return Handler
