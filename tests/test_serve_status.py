"""The node's status page as a browser elsewhere would meet it (issue 29): a Host header other than
localhost is refused (DNS rebinding), a configured token is needed on every request, the history comes a
page at a time, and /health says whether every thread of the node is running."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from cervspine.dicom import orthanc
from cervspine.dicom.settings import Destination, NodeSettings

PREMOVE = Path(__file__).parent / "data" / "premove"
TOKEN = "s3cret-token-of-the-node"


def premove_predictor():
    from cervspine.inference import Predictor

    return Predictor.from_checkpoints(PREMOVE / "stage1.ckpt", [PREMOVE / "slice.ckpt"], device="cpu")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from cervspine.dicom.node import Node

    s = NodeSettings(
        spool=tmp_path_factory.mktemp("spool"), destination=Destination("127.0.0.1", 9, "ORTHANC"),
        allowed_callers=({"ae_title": "PACS", "address": "127.0.0.1"},), port=0,
        http_port=orthanc.free_port(), status_hosts=("cervspine.hospital.example",), status_token=TOKEN,
        status_page_size=50, scoring={"isolate": False}, synthetic=True,
    )  # fmt: skip
    running = Node(s, premove_predictor).start()
    for i in range(120):
        running.queue.event("notice", f"1.2.3.{i}", f"event number {i}")
    yield running
    running.stop()


def get(node, path: str, host: str = "127.0.0.1", headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", node.settings.http_port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_a_host_header_other_than_localhost_is_refused(node):
    for host in (
        "attacker.example",
        "attacker.example:8080",
        "127.0.0.1.nip.io",
        "localhost.attacker.example",
    ):
        code, body = get(node, f"/status.json?token={TOKEN}", host=host)
        assert code == 403 and "Host not allowed" in body
    port = node.settings.http_port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "cervspine.hospital.example"):
        assert get(node, f"/status.json?token={TOKEN}", host=host)[0] == 200


def test_every_request_needs_the_token(node):
    for path in ("/", "/status.json", "/health", "/reports/1.2-0123456789abcdef/report.html"):
        assert get(node, path)[0] == 401
        assert get(node, path + "?token=wrong")[0] == 401
    assert get(node, "/status.json", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    code, page = get(node, f"/?token={TOKEN}")
    assert code == 200 and f"?token={TOKEN}&amp;page=1" in page  # its links keep the token


def test_the_history_comes_a_page_at_a_time(node):
    seen = []
    for page in range(3):
        code, body = get(node, f"/status.json?token={TOKEN}&page={page}")
        snap = json.loads(body)
        assert code == 200 and snap["page"] == page and snap["counts"]["events"] == 120
        seen.append([e["detail"] for e in snap["events"]])
    assert [len(s) for s in seen] == [50, 50, 20]
    assert len({d for s in seen for d in s}) == 120  # no event twice, none left out
    html = get(node, f"/?token={TOKEN}&page=2")[1]
    assert "page 3 of 3" in html and "event number 0" in html and "event number 119" not in html


def test_health_names_every_thread(node):
    code, body = get(node, f"/health?token={TOKEN}")
    assert code == 200 and json.loads(body) == {"ok": True, "problems": []}
    snap = json.loads(get(node, f"/status.json?token={TOKEN}")[1])
    threads = {t["name"]: t for t in snap["threads"]}
    assert set(threads) == {"listener", "scheduler", "scorer", "sender"} and all(
        t["alive"] for t in threads.values()
    )
    assert threads["scheduler"]["last_beat"] and threads["sender"]["errors"] == 0
