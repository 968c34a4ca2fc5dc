"""Load, faults and kill -9 against the served proxy as a plain process
(bench.load): every answer is a whole text or a correct error, nothing leaks,
memory stays flat, and the audit log survives SIGKILL. The numbers for the
note come from ``python -m bench.load`` (500 requests)."""

from __future__ import annotations

import pytest

from bench.load import run

pytestmark = [pytest.mark.timeout(600), pytest.mark.process]


async def test_load_with_faults_then_kill_9(tmp_path):
    r = await run(requests=400, concurrency=32, fault_rate=0.1, work=tmp_path)
    assert r["wrong_count"] == 0, r["wrong"]
    assert r["ok"] + sum(r["errors"].values()) == r["requests"] == 400
    assert r["upstream"]["faults"] > 50 and sum(r["errors"].values()) > 0  # the faults reached the clients too
    assert r["ok"] > 300
    # the upstream HTTP pool may keep up to 20 more idle connections; a leak per failed
    # request (about 40 of them) would exceed that
    assert r["at_end"]["open_fds"] <= r["after_warmup"]["open_fds"] + 20
    assert r["at_end"]["tasks"] <= r["after_warmup"]["tasks"]
    assert r["rss_growth"] < 0.10
    assert r["kill"]["verify_log_exit"] == 0, r["kill"]["verify_log"]
    assert r["kill"]["audit_lines_after_kill"] >= r["kill"]["audit_lines_before_second_load"] + 20  # killed under load


def test_sigterm_during_a_stream_exits_cleanly_and_audits_it(tmp_path):
    """Graceful shutdown: a stream still running at SIGTERM gets ``shutdown_timeout``,
    is then cancelled, and still gets its audit line; exit status 0, no traceback."""
    import os
    import signal
    import sys
    import time

    import httpx

    from bench.load import proxy_config, start
    from proxy.gateway.request_log import verify

    up, upstream = start([sys.executable, "-m", "bench.fake_upstream", "--delay", "0.4"])
    audit = tmp_path / "audit.jsonl"
    cfg = tmp_path / "proxy.toml"
    config = proxy_config(upstream, audit).replace("[server]", "[server]\nshutdown_timeout = 1")
    # One upstream call (and its 0.4 s delay) per token, so that the stream outlives the grace period.
    cfg.write_text(config.replace('remote_model = "fake"', 'remote_model = "fake"\nspeculative = false'))
    proxy, base = start([sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--port", "0"])
    try:
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}
        chunks = []
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/chat/completions", json=body) as r:
            t0 = time.monotonic()
            for line in r.iter_lines():
                chunks.append(line)
                if len(chunks) == 2:
                    os.kill(proxy.pid, signal.SIGTERM)
        assert proxy.wait(30) == 0
        assert time.monotonic() - t0 < 10
        assert "data: [DONE]" not in chunks  # cut, not finished (10 tokens x 0.4 s > 1 s)
        assert "request_cancelled" in [c for c in chunks if c][-1]  # an SSE error event, not a bare cut
        stderr = proxy.stderr.read() if proxy.stderr else ""
        assert "Traceback" not in stderr, stderr[-3000:]
        result = verify(audit)
        assert result.ok and result.lines == 1
        assert result.head in stderr  # the closing log line names the chain's head
    finally:
        for p in (proxy, up):
            if p.poll() is None:
                p.kill()
                p.wait()
