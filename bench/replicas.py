"""Two proxy replicas behind nginx, sharing Redis, under load, faults and a SIGKILL.

    python -m bench.replicas [--requests 1000] [--concurrency 32] [--fault-rate 0.1] [--seed 0] [--json FILE]

Everything runs as plain processes on 127.0.0.1 and stops by itself:

1. :mod:`bench.fake_upstream` (faults in ``--fault-rate`` of its calls), a ``redis-server``
   and two ``deltaproxy serve`` replicas (``replica = "a"`` / ``"b"``, one audit chain each,
   ``limits_storage`` on the Redis), and nginx in front of them (round robin; a replica
   that refuses connections is skipped; no buffering, so streams pass as they come).
2. Per-key limit: 80 requests with a key limited to 60 per minute, through nginx, so
   spread over both replicas: how many pass (the target is 60 ± 5).
3. Load: ``--requests`` chat requests through nginx with the official openai client
   (``max_retries = 5``), ``--concurrency`` at a time, half streamed; each answer must be the
   upstream's whole text. A stream cut by an error event is retried by the client, as an
   application would. One replica is killed with SIGKILL at a random point (seeded) between
   30% and 70% of the requests.
4. Batch: before the load, a ``--batch-lines`` batch is created on the replica that will
   be killed (records and leases in the Redis, ``batch_storage``; files in a folder both
   replicas share); after the kill the other replica takes it over when its lease expires.
   It must complete with every line answered once.
5. Each replica's audit chain is verified (``deltaproxy verify-log`` over both files), and
   every request that got an answer must have a line in one of them (matched by the
   ``X-Request-Id`` the client sent).

Prints a JSON summary (latency p50 and p99 of the answered requests included);
``tests/test_replicas.py`` asserts on the same function at a smaller size.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import openai

from bench.fake_upstream import TEXT
from bench.load import ROOT, fake_model, start

EXPECTED = "".join(TEXT)
LOAD_KEY, LIMITED_KEY = "sk-replicas-load", "sk-replicas-limited"


class Missing(RuntimeError):
    """A server this bench needs is not installed (``scripts/install-services.sh``)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


def _exe(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        raise Missing(f"{name} is not installed (scripts/install-services.sh installs it)")
    return path


def _proxy_config(upstream: str, redis: str, audit: Path, data: Path, replica: str) -> str:
    batches = redis.rsplit("/", 1)[0] + "/1"  # another database than the limits' counts

    def entry(kid: str, secret: str, rpm: int) -> str:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        return f'[[server.keys]]\nid = "{kid}"\nsha256 = "{digest}"\nrpm = {rpm}\n'

    return f"""
[server]
replica = "{replica}"
audit_log = "{audit}"
data_dir = "{data}"
limits_storage = "{redis}"
batch_storage = "{batches}"
batch_lease_seconds = 3
key_max_concurrent = 256
shutdown_timeout = 5

{entry("load", LOAD_KEY, 1_000_000)}
{entry("limited", LIMITED_KEY, 60)}
{fake_model(upstream)}"""


def _nginx_config(prefix: Path, port: int, replicas: list[int]) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in replicas)
    return f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream deltaproxy {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 8m;
        location / {{
            proxy_pass http://deltaproxy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 120s;
            # only a replica that refused the connection (the request was not sent) is skipped
            proxy_next_upstream error;
        }}
    }}
}}
"""


async def _limited(base: str, n: int) -> Counter[int]:
    """``n`` requests with the 60-per-minute key, one at a time, through nginx."""
    client = openai.AsyncOpenAI(base_url=base, api_key=LIMITED_KEY, max_retries=0, timeout=30)
    counts: Counter[int] = Counter()
    for i in range(n):
        try:
            await client.chat.completions.create(
                model="fake",
                messages=[{"role": "user", "content": f"limited {i}"}],
                max_tokens=4,
                temperature=0,
                extra_headers={"X-Request-Id": f"limited-{i}"},
            )
            counts[200] += 1
        except openai.APIStatusError as exc:
            counts[exc.status_code] += 1
    await client.close()
    return counts


async def _create_batch(base: str, lines: int) -> str:
    """Upload a ``lines``-line batch input and start the batch at ``base``; its id."""
    client = openai.AsyncOpenAI(base_url=base, api_key=LOAD_KEY, max_retries=2, timeout=60)
    body = [
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "fake", "messages": [{"role": "user", "content": f"batch {i}"}], "max_tokens": 16},
            }
        )
        for i in range(lines)
    ]
    f = await client.files.create(file=("batch.jsonl", "\n".join(body).encode()), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    await client.close()
    return batch.id


async def _finish_batch(base: str, batch_id: str, timeout: float = 300) -> dict[str, Any]:
    """Wait for the batch to end (through ``base``); its status and what its output holds."""
    client = openai.AsyncOpenAI(base_url=base, api_key=LOAD_KEY, max_retries=5, timeout=60)
    deadline = time.monotonic() + timeout
    batch = await client.batches.retrieve(batch_id)
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        batch = await client.batches.retrieve(batch_id)
    ids: list[str] = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            text = (await client.files.content(file_id)).text
            ids += [json.loads(x)["custom_id"] for x in text.splitlines() if x.strip()]
    await client.close()
    return {
        "status": batch.status,
        "lines_out": len(ids),
        "distinct_lines": len(set(ids)),
        "errors_file": bool(batch.error_file_id),
    }


async def _load(
    base: str, n: int, concurrency: int, kill_at: int, kill: Any
) -> tuple[dict[str, Any], list[float], set[str], set[str]]:
    """Send ``n`` requests; call ``kill()`` once ``kill_at`` have been answered. Returns the
    counts, the answered requests' seconds, the request ids answered, and every id sent."""
    client = openai.AsyncOpenAI(base_url=base, api_key=LOAD_KEY, max_retries=5, timeout=60)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    counts: Counter[str] = Counter()
    seconds: list[float] = []
    answered: set[str] = set()
    sent: set[str] = set()
    done = 0
    killed = False

    async def one(i: int) -> None:
        nonlocal done, killed
        stream = i % 2 == 1
        t0 = time.monotonic()
        for attempt in range(6):  # the client's own retries of a stream cut by an error event
            rid = f"load-{i}-{attempt}"
            sent.add(rid)
            try:
                kwargs: dict[str, Any] = {
                    "model": "fake",
                    "messages": [{"role": "user", "content": f"request {i}"}],
                    "max_tokens": 16,
                    "temperature": 0,
                    "extra_headers": {"X-Request-Id": rid},
                }
                if stream:
                    text = ""
                    chunks = await client.chat.completions.create(stream=True, **kwargs)
                    async for chunk in chunks:
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                else:
                    reply = await client.chat.completions.create(**kwargs)
                    text = reply.choices[0].message.content or ""
            except openai.APIStatusError as exc:
                counts[f"retried_after_{exc.status_code}"] += 1
                continue
            except openai.APIError as exc:  # a stream's error event, or a connection the SDK gave up on
                counts[f"retried_after_{type(exc).__name__}"] += 1
                continue
            if text == EXPECTED:
                counts["ok"] += 1
                answered.add(rid)
                seconds.append(time.monotonic() - t0)
            else:
                counts["wrong"] += 1
            break
        else:
            counts["failed"] += 1
        done += 1
        if not killed and done >= kill_at:
            killed = True
            kill()

    async def worker() -> None:
        while not queue.empty():
            await one(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return dict(counts), seconds, answered, sent


def run(
    requests: int, concurrency: int, fault_rate: float, work: Path, seed: int = 0, batch_lines: int = 1000
) -> dict[str, Any]:
    """The bench (module docstring) in folder ``work``; its JSON summary.

    Raises:
        Missing: redis-server or nginx is not installed.
    """
    redis_exe, nginx_exe = _exe("redis-server"), _exe("nginx")
    py = sys.executable
    procs: list[subprocess.Popen[Any]] = []
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        up, upstream = start([py, "-m", "bench.fake_upstream", "--fault-rate", str(fault_rate), "--seed", str(seed)])
        procs.append(up)
        redis_port = _free_port()
        redis = subprocess.Popen(
            [redis_exe, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=open(logs / "redis.log", "w"),
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        procs.append(redis)
        _wait_port(redis_port, redis, "redis-server")
        replicas: dict[str, subprocess.Popen[Any]] = {}
        ports: list[int] = []
        for name in ("a", "b"):
            cfg = work / f"proxy-{name}.toml"
            audit = work / "audit-{replica}.jsonl"
            cfg.write_text(_proxy_config(upstream, f"redis://127.0.0.1:{redis_port}/0", audit, work / "data", name))
            port = _free_port()
            serve = [
                py,
                "-m",
                "proxy.cli",
                "serve",
                "--config",
                str(cfg),
                "--port",
                str(port),
                "--log-level",
                "WARNING",
            ]
            proc = subprocess.Popen(
                serve, stdout=subprocess.DEVNULL, stderr=open(logs / f"proxy-{name}.log", "w"), cwd=ROOT
            )
            procs.append(proc)
            replicas[name] = proc
            ports.append(port)
        for name, port in zip(replicas, ports, strict=True):
            _wait_port(port, replicas[name], f"replica {name}", timeout=120)
        nginx_port = _free_port()
        prefix = work / "nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(_nginx_config(prefix, nginx_port, ports))
        nginx = subprocess.Popen(
            [nginx_exe, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=open(logs / "nginx.log", "w"),
        )
        procs.append(nginx)
        _wait_port(nginx_port, nginx, "nginx")
        base = f"http://127.0.0.1:{nginx_port}/v1"

        limited = asyncio.run(_limited(base, 80))
        batch_id = asyncio.run(_create_batch(f"http://127.0.0.1:{ports[1]}/v1", batch_lines)) if batch_lines else None
        rng = random.Random(seed)
        kill_at = rng.randint(int(0.3 * requests), int(0.7 * requests))
        victim = replicas["b"]
        at_kill: dict[str, Any] = {}

        def kill() -> None:
            if batch_id:  # where the batch stood when its replica died (its record in Redis)
                import redis

                with redis.Redis(port=redis_port, db=1, decode_responses=True) as r:
                    record = json.loads(str(r.hget("deltaproxy:batches", batch_id)))
                at_kill.update(status=record["status"], completed=record["request_counts"]["completed"])
            os.kill(victim.pid, signal.SIGKILL)

        t0 = time.monotonic()
        counts, seconds, answered, sent = asyncio.run(_load(base, requests, concurrency, kill_at, kill))
        wall = time.monotonic() - t0
        victim.wait(10)
        batch = asyncio.run(_finish_batch(base, batch_id)) if batch_id else None
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    audits = sorted(work.glob("audit-*.jsonl"))
    check = subprocess.run(
        [py, "-m", "proxy.cli", "verify-log", *map(str, audits)], capture_output=True, text=True, cwd=ROOT
    )
    logged: set[str] = set()
    lines_per_replica: dict[str, int] = {}
    for path in audits:
        lines = path.read_bytes().split(b"\n")[:-1]
        lines_per_replica[path.stem.removeprefix("audit-")] = len(lines)
        for raw in lines:
            rid = json.loads(raw).get("request_id")
            if isinstance(rid, str):
                logged.add(rid)
    ordered = sorted(seconds)

    def quantile(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

    return {
        "requests": requests,
        "concurrency": concurrency,
        "fault_rate": fault_rate,
        "seed": seed,
        "killed_replica": "b",
        "killed_after_answers": kill_at,
        "answers": counts,
        "answered_correctly": counts.get("ok", 0),
        "wrong": counts.get("wrong", 0),
        "failed_after_retries": counts.get("failed", 0),
        "latency_p50_s": quantile(0.5),
        "latency_p99_s": quantile(0.99),
        "latency_mean_s": round(statistics.fmean(seconds), 3) if seconds else None,
        "wall_s": round(wall, 1),
        "limited_key": {"rpm": 60, "sent": 80, "statuses": dict(limited)},
        "batch": {"lines": batch_lines, "created_on": "b", "at_kill": at_kill, **(batch or {})},
        "audit": {
            "lines_per_replica": lines_per_replica,
            "verify_log_exit": check.returncode,
            "verify_log": (check.stdout + check.stderr).strip(),
            "answered_requests_missing_from_the_logs": sorted(answered - logged)[:20],
            "answered_missing_count": len(answered - logged),
            "ids_sent": len(sent),
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--fault-rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-lines", type=int, default=1000, help="lines of the batch started on the replica killed")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    from bench import report

    with tempfile.TemporaryDirectory() as tmp:
        try:
            result = run(
                args.requests,
                args.concurrency,
                args.fault_rate,
                Path(tmp),
                seed=args.seed,
                batch_lines=args.batch_lines,
            )
        except Missing as exc:
            sys.exit(f"bench.replicas: {exc}")
    report(result, args.json)


if __name__ == "__main__":
    main()
