"""``--engine ray`` (issue 27): Ray Data workers answer the lines, the driver writes them;
the output is the single-process run's, resumable by line, and a worker that cannot start
is a clear error. The first tests use a toy worker on a local Ray cluster; the last runs
``deltaproxy batch`` and ``redact`` on the embedded default both ways (bench.ray_engine)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from fakes import EchoWorker

from proxy.jobs.ray_engine import EngineError, RaySettings
from proxy.jobs.runner import LineRunner, OnRay

pytestmark = [pytest.mark.process, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local cluster for the module (the engine then neither starts nor stops one); its
    workers import :mod:`fakes` from this folder."""
    import ray

    path = os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield
    ray.shutdown()


def _items(n: int) -> list[dict[str, Any]]:
    """``n`` items, every tenth a bad line (answered by the driver, never sent to Ray)."""
    return [{"id": f"i{k}", "text": f"line {k}", "bad": k % 10 == 9} for k in range(n)]


async def _run(out: Path, items: list[dict[str, Any]], ray: OnRay | None) -> None:
    data = json.dumps(items).encode()
    runner: LineRunner[dict[str, Any]] = LineRunner(
        out, data, item_key=lambda i: f"id:{i['id']}", line_key=lambda o: f"id:{o['id']}"
    )
    runner.open(items)
    worker = EchoWorker()

    async def answer(item: dict[str, Any]) -> dict[str, Any]:
        if item["bad"]:
            return {"id": item["id"], "error": "bad line", "pid": os.getpid()}
        return await worker.answer(item)

    class NoBar:
        def update(self, n: float | None = 1) -> None: ...

        def close(self) -> None: ...

    await runner.run(answer, counts=dict, bar=NoBar(), concurrency=3, ray=ray)


def _on_ray(workers: int = 2, fail: bool = False) -> OnRay:
    return OnRay(
        RaySettings(workers=workers, concurrency=3),
        functools.partial(EchoWorker, fail),
        lambda i: None if i["bad"] else {"id": i["id"], "text": i["text"]},
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


async def test_ray_writes_the_lines_the_local_engine_writes(tmp_path: Path, ray_cluster):
    items = _items(60)
    await _run(tmp_path / "local.jsonl", items, None)
    await _run(tmp_path / "ray.jsonl", items, _on_ray())
    local, ray = _lines(tmp_path / "local.jsonl"), _lines(tmp_path / "ray.jsonl")
    assert len(ray) == len({o["id"] for o in ray}) == 60

    def without_pid(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {o["id"]: {k: v for k, v in o.items() if k != "pid"} for o in lines}

    assert without_pid(local) == without_pid(ray)
    by_id = {o["id"]: o for o in ray}
    bad = {i["id"] for i in items if i["bad"]}
    assert all(by_id[i]["pid"] == os.getpid() for i in bad)  # the driver answered the bad lines
    answered_on_ray = {by_id[i["id"]]["pid"] for i in items if not i["bad"]}
    assert os.getpid() not in answered_on_ray and len(answered_on_ray) == 2  # by the two workers


async def test_a_ray_run_continues_an_interrupted_output_line_by_line(tmp_path: Path, ray_cluster):
    """An output holding 25 lines (and half a line) of an earlier run: Ray answers only the
    other lines, and every line is there once."""
    items = _items(50)
    out = tmp_path / "out.jsonl"
    await _run(out, items, None)
    first = out.read_bytes().splitlines(keepends=True)[:25]
    out.write_bytes(b"".join(first) + b'{"id": "i4')  # cut mid-line, as a SIGKILL leaves it
    await _run(out, items, _on_ray())
    lines = _lines(out)
    assert [json.dumps(o) for o in lines[:25]] == [json.dumps(json.loads(x)) for x in first]
    assert sorted(o["id"] for o in lines) == sorted(i["id"] for i in items)
    assert all(o["pid"] != os.getpid() for o in lines[25:] if "error" not in o)


async def test_a_worker_that_cannot_start_is_a_clear_error_and_the_output_stays_whole(tmp_path: Path, ray_cluster):
    out = tmp_path / "out.jsonl"
    with pytest.raises(EngineError, match="cannot start: its model is missing"):
        await _run(out, _items(20), _on_ray(fail=True))
    lines = _lines(out)  # the bad lines the driver answered, each whole
    assert [o["id"] for o in lines] == ["i9", "i19"]


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="at least 1"):
        RaySettings(workers=0).check()
    with pytest.raises(ValueError, match="above 0"):
        RaySettings(cpus_per_worker=0).check()


def test_an_unreachable_address_or_an_impossible_worker_fails_fast_and_writes_nothing(tmp_path: Path, capsys):
    """Ray itself retries a dead address for minutes; the command says so at once (exit 1),
    before any output file exists."""
    import socket

    from proxy.cli.main import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}) + "\n")
    for address, says in (
        (dead, "no Ray cluster answers"),
        (f"ray://{dead}", "no Ray cluster answers"),
        ("nonsense", "is not host:port"),
    ):
        argv = ["batch", "--in", str(inp), "--out", str(out), "--engine", "ray", "--ray-address", address]
        assert main([*argv, "--no-offset"]) == 1
        assert says in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "out.jsonl.progress.json").exists()
    # a worker that asks for more CPUs than the local cluster has would wait for ever
    argv = ["batch", "--in", str(inp), "--out", str(out), "--engine", "ray", "--cpus-per-worker", "1000"]
    assert main([*argv, "--no-offset"]) == 1
    assert "a local Ray cluster has" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
def test_batch_and_redaction_on_ray_match_the_single_process_run(tmp_path: Path):
    """The README's model: a 40-line batch (killed with SIGKILL a third of the way under Ray,
    then resumed), a 40-line redaction file and an audit of 4 forget items, each run by
    ``deltaproxy`` with ``--engine local`` and ``--engine ray --workers 2``: the same answer
    for every line, none twice, and the same audit summary."""
    from bench.ray_engine import run

    result = run(tmp_path, batch_lines=40, redact_lines=40, workers=2, max_tokens=4, kill=True, audit_items=4)
    print(json.dumps(result, indent=1))
    for part, n in (("batch", 40), ("redact", 40), ("audit", 4)):
        r = result[part]
        assert r["identical"], r
        assert r["lines"] == [n, n] and r["duplicates"] == [0, 0]
    assert result["audit"]["same_summary"]
    assert result["batch"]["killed_then_resumed"]["killed_at_lines"] < 40
    assert result["redact"]["redacted"] >= 10  # the 12 forget facts, as in the demo redaction test


@pytest.mark.slow
def test_an_interrupted_ray_run_exits_at_once_and_resumes(tmp_path: Path):
    """SIGTERM and Ctrl-C (SIGINT) while Ray workers answer: the command exits within
    seconds with 143 or 130, starts no new cluster on the way out, and the same command
    then completes the output, each line once."""
    import signal
    import subprocess
    import sys
    import time

    from proxy.config import DEFAULT_MODEL

    root = Path(__file__).resolve().parents[1]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        for i in range(40):
            body = {
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": f"Write a long story about the number {i}."}],
                "max_tokens": 48,
                "temperature": 0,
            }
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            f.write("\n")
    cmd = [sys.executable, "-m", "proxy.cli", "batch", "--in", str(inp), "--out", str(out), "--no-progress"]
    cmd += ["--engine", "ray", "--workers", "2", "--no-offset"]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def lines() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        before = lines()
        deadline = time.monotonic() + 300
        while lines() < before + 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")[-2000:]
        proc.send_signal(sig)
        t0 = time.monotonic()
        text = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert proc.returncode == code, text[-2000:]
        assert time.monotonic() - t0 < 20, text[-2000:]
        assert "Started a local Ray instance" not in text and "Traceback" not in text
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [json.loads(x)["custom_id"] for x in out.read_bytes().splitlines()]
    assert len(ids) == len(set(ids)) == 40
