"""Load, faults and kill -9 against the served proxy as a plain process
(bench.load): every answer is a whole text or a correct error, nothing leaks,
memory stays flat, and the audit log survives SIGKILL. The numbers for the
note come from ``python -m bench.load`` (500 requests)."""

from __future__ import annotations

import pytest

from bench.load import run

pytestmark = pytest.mark.timeout(600)


async def test_load_with_faults_then_kill_9(tmp_path):
    r = await run(requests=200, concurrency=32, fault_rate=0.1, work=tmp_path)
    assert r["wrong_count"] == 0, r["wrong"]
    assert r["ok"] + sum(r["errors"].values()) == r["requests"] == 200
    assert r["upstream"]["faults"] > 50 and sum(r["errors"].values()) > 0  # the faults reached the clients too
    assert r["ok"] > 150
    assert r["at_end"]["open_fds"] <= r["after_warmup"]["open_fds"] + 2
    assert r["at_end"]["tasks"] <= r["after_warmup"]["tasks"]
    assert r["rss_growth"] < 0.10
    assert r["kill"]["verify_log_exit"] == 0, r["kill"]["verify_log"]
