"""docker-compose.yml's commands, run as plain processes on 127.0.0.1 (Docker cannot run
here): the llama.cpp upstream, Redis, the two proxy replicas with deploy/proxy.toml and
nginx with deploy/nginx.conf in front of them, each service's own health check, chat
completions through nginx with the openai client (one on each replica), each replica's
audit chain, and a graceful SIGTERM. Only hosts, ports and paths are rewritten; the
commands, health checks and configuration files are the compose file's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import yaml
from conftest import free_port

from proxy.gateway.request_log import verify_chains

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, os.environ.get("PATH", ""), "/usr/sbin"])
    return {**os.environ, "PYTHON": sys.executable, "PATH": path, **(extra or {})}


def _local(args: list[str], port_from: str, port_to: int) -> list[str]:
    out = []
    for a in args:
        a = a.replace("0.0.0.0", "127.0.0.1").replace(f"127.0.0.1:{port_from}", f"127.0.0.1:{port_to}")
        a = a.replace(f"/dev/tcp/127.0.0.1/{port_from}", f"/dev/tcp/127.0.0.1/{port_to}")
        out.append(str(port_to) if a == port_from else a)
    return out


def _healthy(test: list[str], deadline: float, proc: subprocess.Popen) -> None:
    assert test[0] == "CMD"
    cmd = [sys.executable, *test[2:]] if test[1] == "python" else test[1:]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{test} : the service exited with {proc.returncode}")
        if subprocess.run(cmd, capture_output=True, env=_env()).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"not healthy in time: {test}")


def test_compose_services_as_plain_processes(tmp_path):
    for exe in ("redis-server", "redis-cli", "nginx"):
        if shutil.which(exe, path=_env()["PATH"]) is None:
            pytest.skip(f"{exe} is not installed (scripts/install-services.sh installs it)")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    up, redis, nginx = services["upstream"], services["redis"], services["nginx"]
    replicas = {name: services[name] for name in ("proxy-a", "proxy-b")}
    for px in replicas.values():
        assert px["depends_on"] == {
            "upstream": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
    assert set(nginx["depends_on"]) == set(replicas)
    ports = {name: free_port() for name in ("upstream", "redis", "proxy-a", "proxy-b", "nginx")}
    logs: list = []
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    try:
        upstream = start(_local(up["command"], "8080", ports["upstream"]), "upstream")
        assert "redis:/data" in redis["volumes"]
        (tmp_path / "redis").mkdir()
        rd = start(
            [str(tmp_path / "redis") if a == "/data" else a for a in _local(redis["command"], "6379", ports["redis"])],
            "redis",
        )
        _healthy(_local(redis["healthcheck"]["test"], "6379", ports["redis"]), time.monotonic() + 30, rd)
        _healthy(_local(up["healthcheck"]["test"], "8080", ports["upstream"]), time.monotonic() + 180, upstream)

        started: dict[str, subprocess.Popen] = {}
        for name, px in replicas.items():
            cfg_src = px["command"][px["command"].index("--config") + 1]
            config = (ROOT / cfg_src).read_text()
            for container in (
                "http://upstream:8080/v1",
                "redis://redis:6379/",
                "/var/log/deltaproxy/",
                "/var/lib/deltaproxy",
            ):
                assert container in config
            cfg = tmp_path / f"{name}.toml"
            cfg.write_text(
                config.replace("http://upstream:8080/v1", f"http://127.0.0.1:{ports['upstream']}/v1")
                .replace("redis://redis:6379/", f"redis://127.0.0.1:{ports['redis']}/")
                .replace("/var/log/deltaproxy/", f"{tmp_path}/")
                .replace("/var/lib/deltaproxy", f"{tmp_path}/data")
            )
            cmd = [str(cfg) if a == cfg_src else a for a in _local(px["command"], "8000", ports[name])]
            env = {k: v for k, v in px["environment"].items() if k != "DELTAPROXY_CACHE"}  # a container path
            started[name] = start(cmd, name, env)
        for name, px in replicas.items():
            # the first start may train the demo offset (minutes), as the container's does;
            # the replicas share the cache, so one trains and the other waits for it
            _healthy(_local(px["healthcheck"]["test"], "8000", ports[name]), time.monotonic() + 600, started[name])

        conf_mount = next(v for v in nginx["volumes"] if v.startswith("./deploy/nginx.conf:"))
        conf_in_container = conf_mount.split(":")[1]
        conf = (ROOT / "deploy" / "nginx.conf").read_text()
        for name in replicas:
            assert f"server {name}:8000" in conf
            conf = conf.replace(f"server {name}:8000", f"server 127.0.0.1:{ports[name]}")
        assert "listen 8000;" in conf
        conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{ports['nginx']};")
        conf = conf.replace(
            "http {",
            f"http {{\n    client_body_temp_path {tmp_path}/nginx-body;\n    proxy_temp_path {tmp_path}/nginx-proxy;",
            1,
        )
        (tmp_path / "nginx.conf").write_text(conf)
        cmd = [str(tmp_path / "nginx.conf") if a == conf_in_container else a for a in nginx["command"]]
        cmd = [a.replace("daemon off;", f"daemon off; pid {tmp_path}/nginx.pid;") for a in cmd]
        cmd[1:1] = ["-e", str(tmp_path / "nginx-error.log")]
        ng = start(cmd, "nginx")
        _healthy(_local(nginx["healthcheck"]["test"], "8000", ports["nginx"]), time.monotonic() + 30, ng)

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['nginx']}/v1", api_key="none", max_retries=0)
        request_ids = []
        for _ in range(2):  # round robin: one on each replica
            r = client.chat.completions.create(
                model="smollm2-demo",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=8,
                temperature=0,
            )
            assert r.choices[0].message.content and r.usage.completion_tokens > 0
            assert r._request_id and r._request_id.startswith("req_")  # the SDK reads X-Request-Id
            request_ids.append(r._request_id)
        client.close()

        for p in started.values():
            p.send_signal(signal.SIGTERM)
        assert [p.wait(30) for p in started.values()] == [0, 0]  # graceful: stop, finish, close the audit log
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    chains = sorted(tmp_path.glob("audit-*.jsonl"))
    reports, problems = verify_chains(chains)
    assert not problems and [c.name for c in chains] == ["audit-proxy-a.jsonl", "audit-proxy-b.jsonl"]
    assert all(r.result.ok and r.result.lines == 1 for r in reports) and [r.replica for r in reports] == [
        "proxy-a",
        "proxy-b",
    ]
    logged = {json.loads(c.read_text())["request_id"] for c in chains}
    assert logged == set(request_ids)
    for name, report in zip(replicas, reports, strict=True):
        log_text = (tmp_path / f"{name}.log").read_text()
        assert '"message": "shutting down' in log_text  # log_format = "json"
        assert report.result.head in log_text  # the closing line records the chain's head
        access = [json.loads(x) for x in log_text.splitlines() if '"logger": "aiohttp.access"' in x]
        assert any(a["request_id"] in request_ids and "/v1/chat/completions" in a["message"] for a in access)
