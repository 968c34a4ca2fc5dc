"""Two replicas behind nginx, sharing Redis, under faults and a SIGKILL (bench.replicas at a
smaller size): every request answered whole after the client's retries, a 60-per-minute key
gets 60 across both replicas, each replica's audit chain verifies and no answered request is
missing from them, and a batch whose replica was killed completes on the other, every line
answered once."""

from __future__ import annotations

import pytest

from bench.replicas import Missing, run

pytestmark = [pytest.mark.process, pytest.mark.timeout(600)]


def test_two_replicas_behind_nginx_survive_faults_and_a_kill(tmp_path):
    try:
        r = run(requests=300, concurrency=16, fault_rate=0.1, work=tmp_path, batch_lines=300)
    except Missing as exc:
        pytest.skip(str(exc))
    assert r["answered_correctly"] == 300 and r["wrong"] == 0 and r["failed_after_retries"] == 0, r["answers"]
    assert r["limited_key"]["statuses"] == {200: 60, 429: 20}
    assert r["audit"]["verify_log_exit"] == 0, r["audit"]["verify_log"]
    assert r["audit"]["answered_missing_count"] == 0
    assert set(r["audit"]["lines_per_replica"]) == {"a", "b"} and min(r["audit"]["lines_per_replica"].values()) > 20
    b = r["batch"]
    assert b["at_kill"]["status"] == "in_progress", b  # the kill took the batch's replica mid-way
    assert b["status"] == "completed" and b["lines_out"] == b["distinct_lines"] == 300, b
