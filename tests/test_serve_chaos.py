"""Issue 29's faults at once, small (the 200-study run is ``experiments/benchmarks/node_chaos.py``): 20
studies from 4 concurrent senders into ``python -m cervspine.serve`` while it is SIGKILLed 3 times, one
series crashes the worker that decodes it, one mixes two patients, another address floods the port, and
the destination refuses for the first 10 s — every other study answered exactly once, those two
quarantined with their reasons, the senders never refused, the spool under its limit."""

from __future__ import annotations

import pytest

from cervspine.dicom import orthanc
from experiments.benchmarks.node_chaos import Chaos, check, run_chaos

pytestmark = pytest.mark.skipif(not orthanc.available(), reason="no Orthanc (make dicom-tools)")


def test_twenty_studies_through_kills_poison_flood_and_a_refusing_pacs_are_each_answered_once(tmp_path):
    c = Chaos(n=20, senders=4, size=32, slices=8, kills=3, flood=50, refuse_s=10, timeout_s=900)
    out = run_chaos(tmp_path / "run", tmp_path / "studies", c)
    assert check(out, c) == []
    assert out.flood_refused > 0 and len(out.latency_s) == c.n
