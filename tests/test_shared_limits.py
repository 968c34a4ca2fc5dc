"""Per-key requests per minute shared by replicas through Redis (``server.limits_storage``):
two servers that name the same Redis give a key its limit once, not once each; a Redis that
does not answer is a retryable 503 and makes ``/ready`` fail, never a request let through
uncounted."""

from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest
from aiohttp.test_utils import TestServer
from conftest import free_port
from fakes import FakeRemote, script

from proxy.config import ClientKey, ConfigError, ServerConfig, load_config
from proxy.decoding.served import ServedModel
from proxy.server.app import create_app

SECRET = "sk-replica-test"
KEY = ClientKey(id="team", sha256=hashlib.sha256(SECRET.encode()).hexdigest(), rpm=60)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


async def _replica(settings: ServerConfig) -> TestServer:
    model = ServedModel("m", FakeRemote(script(["One", " two"])))
    server = TestServer(create_app({"m": model}, settings, batches=False))
    await server.start_server()
    return server


async def test_two_replicas_share_a_keys_requests_per_minute(redis_url):
    settings = ServerConfig(keys=(KEY,), limits_storage=redis_url.replace("/0", "/1"))
    replicas = [await _replica(settings), await _replica(settings)]
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SECRET}"}, timeout=30) as http:
            for i in range(80):
                url = str(replicas[i % 2].make_url("/v1/chat/completions"))
                r = await http.post(url, json=BODY)
                statuses.append(r.status_code)
                if r.status_code == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
            ready = await http.get(str(replicas[0].make_url("/ready")))
    finally:
        for s in replicas:
            await s.close()
    assert statuses.count(200) == 60 and statuses.count(429) == 20, statuses
    assert statuses[:60] == [200] * 60  # the window is exact: the first 60 pass, on either replica
    assert ready.status_code == 200 and ready.json()["limits_storage"] == "ok"


async def test_a_redis_that_does_not_answer_is_a_503_and_not_ready():
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = await _replica(ServerConfig(limits_storage=dead))
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(str(server.make_url("/v1/chat/completions")), json=BODY)
            ready = await http.get(str(server.make_url("/ready")))
    finally:
        await server.close()
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "limits_unavailable"
    assert ready.status_code == 503 and ready.json()["limits_storage"] != "ok"


def test_limits_storage_must_be_a_redis_url(tmp_path):
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        '[server]\nlimits_storage = "memcached://127.0.0.1:11211"\n\n[models.m]\nbackend = "openai-chat"\nbase_url = "http://127.0.0.1:1/v1"\n'
    )
    with pytest.raises(ConfigError, match="limits_storage"):
        load_config(str(cfg))


def test_the_default_keeps_counts_in_memory():
    from limits.aio.storage import MemoryStorage

    from proxy.gateway.limits import Limits

    assert isinstance(Limits(ServerConfig()).storage, MemoryStorage)
    asyncio.run(Limits(ServerConfig()).check())  # memory always answers
