"""A bounded load test of the served proxy on loopback, with faults and a kill -9.

    python -m bench.load [--requests 500] [--concurrency 32] [--fault-rate 0.1] [--json FILE]

1. Starts :mod:`bench.fake_upstream` (faults in ``--fault-rate`` of its calls)
   and ``deltaproxy serve`` on it (``openai-chat`` backend, vLLM-style
   continuation, 2 attempts per upstream call, audit log on), both as plain
   processes on 127.0.0.1, the commands of ``docker-compose.yml``'s kind.
2. Sends ``--requests`` chat requests, ``--concurrency`` at a time, half of
   them streamed, through aiohttp; checks each answer: the whole text with
   ``finish_reason: "stop"``, or an OpenAI error body with a 502/503/504
   status, or (streams) an SSE ``error`` event with no ``[DONE]`` after it.
3. Reads the server's ``/metrics`` after a warm-up and at the end: open file
   descriptors, asyncio tasks, resident memory.
4. Loads it again and kills it with SIGKILL mid-way; the audit log must
   verify line by line up to its last complete line.

Prints a JSON summary; ``tests/test_load.py`` asserts on the same function.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.fake_upstream import TEXT

EXPECTED = "".join(TEXT)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoadResult:
    requests: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Correct error answers by kind (``http_502``, ``stream_upstream_unavailable``...)."""
    wrong: list[str] = field(default_factory=list)
    """Answers that were neither a correct body nor a correct error."""
    seconds: float = 0.0


def start(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start a process that prints ``base_url: URL`` when it is ready; returns it and the URL."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{cmd[:3]} exited ({proc.wait()}): {err[-2000:]}")
        m = re.match(r"base_url: (\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not start in 120 s")


def fake_model(upstream: str) -> str:
    """The ``[models.fake]`` section on :mod:`bench.fake_upstream` at ``upstream`` (vLLM-style
    continuation, 2 attempts per upstream call)."""
    return f"""
[models.fake]
backend = "openai-chat"
base_url = "{upstream}"
remote_model = "fake"
prefill = "vllm"
retry_attempts = 2
retry_seconds = 5
read_timeout = 10
"""


def proxy_config(upstream: str, audit_log: Path) -> str:
    return f"""
[server]
audit_log = "{audit_log}"
key_max_concurrent = 256
key_rpm = 1000000
{fake_model(upstream)}"""


async def one(session: aiohttp.ClientSession, base: str, i: int, result: LoadResult) -> None:
    stream = i % 2 == 1
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
    }
    result.requests += 1
    try:
        async with session.post(f"{base}/chat/completions", json=body) as r:
            if r.status != 200:
                err = (await r.json()).get("error", {})
                if r.status in (502, 503, 504) and err.get("type") == "upstream_error" and err.get("message"):
                    result.errors[f"http_{r.status}"] += 1
                else:
                    result.wrong.append(f"{r.status}: {err}")
                return
            if not stream:
                data = await r.json()
                c = data["choices"][0]
                if c["message"]["content"] == EXPECTED and c["finish_reason"] == "stop":
                    result.ok += 1
                else:
                    result.wrong.append(f"body {c}")
                return
            text, finish, done, error = "", None, False, None
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                for c in chunk["choices"]:
                    text += c["delta"].get("content") or ""
                    finish = c["finish_reason"] or finish
            if error is not None and not done and error.get("type") == "upstream_error":
                result.errors[f"stream_{error.get('code')}"] += 1
            elif error is None and done and text == EXPECTED and finish == "stop":
                result.ok += 1
            else:
                result.wrong.append(f"stream text={text!r} finish={finish} done={done} error={error}")
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.wrong.append(f"transport {type(exc).__name__}: {exc}")


async def load(base: str, n: int, concurrency: int, start_index: int = 0) -> LoadResult:
    result = LoadResult()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(start_index, start_index + n):
        queue.put_nowait(i)
    t0 = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while not queue.empty():
                await one(session, base, queue.get_nowait(), result)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.monotonic() - t0
    return result


async def gauges(base: str) -> dict[str, float]:
    """Open fds, asyncio tasks and RSS (MB) of the server, from its /metrics."""
    root = base.rsplit("/v1", 1)[0]
    async with aiohttp.ClientSession() as s, s.get(f"{root}/metrics") as r:
        text = await r.text()
    values = {}
    for name, key in (
        ("process_open_fds", "open_fds"),
        ("deltaproxy_asyncio_tasks", "tasks"),
        ("process_resident_memory_bytes", "rss_mb"),
    ):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        values[key] = float(m.group(1)) if m else float("nan")
    values["rss_mb"] /= 1e6
    return values


async def run(requests: int, concurrency: int, fault_rate: float, work: Path) -> dict[str, Any]:
    py = sys.executable
    up, upstream = start([py, "-m", "bench.fake_upstream", "--fault-rate", str(fault_rate)])
    audit = work / "audit.jsonl"
    cfg = work / "proxy.toml"
    cfg.write_text(proxy_config(upstream, audit))
    serve = [py, "-m", "proxy.cli", "serve", "--config", str(cfg), "--port", "0", "--log-level", "ERROR"]
    proxy, base = start(serve)
    try:
        warm = max(1, requests // 5)
        warm_result = await load(base, warm, concurrency)
        await asyncio.sleep(0.5)
        after_warmup = await gauges(base)
        main = await load(base, requests, concurrency, start_index=warm)
        await asyncio.sleep(0.5)
        at_end = await gauges(base)
        async with aiohttp.ClientSession() as s, s.get(upstream.rsplit("/v1", 1)[0] + "/stats") as r:
            upstream_stats = await r.json()
        audit_lines_before_kill = len(audit.read_bytes().splitlines())
        # kill -9 in the middle of a second load
        task = asyncio.create_task(load(base, requests, concurrency, start_index=warm + requests))
        deadline = time.monotonic() + 60
        while len(audit.read_bytes().splitlines()) < audit_lines_before_kill + 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # kill once the second load is well under way
        os.kill(proxy.pid, signal.SIGKILL)
        proxy.wait()
        killed = await task
    finally:
        for p in (proxy, up):
            if p.poll() is None:
                p.kill()
                p.wait()
    check = subprocess.run([py, "-m", "proxy.cli", "verify-log", str(audit)], capture_output=True, text=True, cwd=ROOT)
    return {
        "requests": main.requests,
        "concurrency": concurrency,
        "fault_rate": fault_rate,
        "ok": main.ok,
        "errors": dict(main.errors),
        "wrong": main.wrong[:20],
        "wrong_count": len(main.wrong) + len(warm_result.wrong),
        "seconds": round(main.seconds, 2),
        "requests_per_second": round(main.requests / main.seconds, 1),
        "upstream": upstream_stats,
        "after_warmup": after_warmup,
        "at_end": at_end,
        "rss_growth": round(at_end["rss_mb"] / after_warmup["rss_mb"] - 1, 4),
        "kill": {
            "requests_sent": killed.requests,
            "answered_before_kill": killed.ok + sum(killed.errors.values()),
            "audit_lines_before_second_load": audit_lines_before_kill,
            "audit_lines_after_kill": len(audit.read_bytes().split(b"\n")) - 1,
            "verify_log_exit": check.returncode,
            "verify_log": (check.stdout + check.stderr).strip(),
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--fault-rate", type=float, default=0.1)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(run(a.requests, a.concurrency, a.fault_rate, Path(tmp)))
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
