"""docker-compose.yml's commands, run as plain processes on 127.0.0.1 (Docker
cannot run here): the llama.cpp upstream and the proxy with deploy/proxy.toml,
each service's own health check, a chat completion through the openai client,
the audit log, and a graceful SIGTERM. Only hosts, ports and paths are
rewritten; the commands themselves are the compose file's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml
from conftest import free_port

from proxy.gateway.request_log import verify

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PYTHON": sys.executable, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def _local(args: list[str], port_from: str, port_to: int) -> list[str]:
    out = []
    for a in args:
        a = a.replace("0.0.0.0", "127.0.0.1").replace(f"127.0.0.1:{port_from}", f"127.0.0.1:{port_to}")
        out.append(str(port_to) if a == port_from else a)
    return out


def _healthy(test: list[str], deadline: float, proc: subprocess.Popen) -> None:
    assert test[0] == "CMD" and test[1] == "python"
    cmd = [sys.executable, *test[2:]]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{test} : the service exited with {proc.returncode}")
        if subprocess.run(cmd, capture_output=True, env=_env()).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"not healthy in time: {test}")


def test_compose_services_as_plain_processes(tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    up, px = compose["services"]["upstream"], compose["services"]["proxy"]
    assert px["depends_on"]["upstream"]["condition"] == "service_healthy"
    up_port, px_port = free_port(), free_port()
    logs: list = []
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        upstream = start(_local(up["command"], "8080", up_port), "upstream")
        _healthy(_local(up["healthcheck"]["test"], "8080", up_port), time.monotonic() + 180, upstream)

        cfg_src = px["command"][px["command"].index("--config") + 1]
        config = (ROOT / cfg_src).read_text()
        assert "http://upstream:8080/v1" in config and "/var/log/deltaproxy/audit.jsonl" in config
        audit = tmp_path / "audit.jsonl"
        cfg = tmp_path / "proxy.toml"
        cfg.write_text(
            config.replace("http://upstream:8080/v1", f"http://127.0.0.1:{up_port}/v1").replace(
                "/var/log/deltaproxy/audit.jsonl", str(audit)
            )
        )
        cmd = [str(cfg) if a == cfg_src else a for a in _local(px["command"], "8000", px_port)]
        proxy = start(cmd, "proxy")
        # the first start may train the demo offset (minutes), as the container's does
        _healthy(_local(px["healthcheck"]["test"], "8000", px_port), time.monotonic() + 600, proxy)

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{px_port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(
            model="smollm2-demo",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
        )
        assert r.choices[0].message.content and r.usage.completion_tokens > 0
        request_id = r._request_id  # the SDK reads X-Request-Id
        assert request_id and request_id.startswith("req_")
        client.close()

        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) == 0  # graceful: stops, finishes, closes the audit log
        result = verify(audit)
        assert result.ok and result.lines == 1
        log_text = (tmp_path / "proxy.log").read_text()
        assert '"message": "shutting down' in log_text  # log_format = "json"
        assert result.head in log_text  # the closing line records the chain's head
        access = [json.loads(x) for x in log_text.splitlines() if '"logger": "aiohttp.access"' in x]
        assert any(a["request_id"] == request_id and "/v1/chat/completions" in a["message"] for a in access)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
