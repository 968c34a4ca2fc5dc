"""The gateway (proxy.gateway, proxy.gateway.request_log): client keys, per-key limits,
request ids, Prometheus metrics, readiness and the hash-chained audit log,
through the real openai client and aiohttp's test client against our app,
with a scripted fake remote that counts the calls reaching it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib

import openai
import pytest
from fakes import FakeRemote, script

from adapters.base import RemoteUnavailable
from proxy.cli.main import main as cli
from proxy.config import ClientKey, ConfigError, ServerConfig, load_config
from proxy.decoding.served import ServedModel
from proxy.gateway.request_log import GENESIS, AuditLog, AuditLogError, verify
from proxy.server.app import create_app

WORDS = ["Hi", " there", ",", " friend", "!"]
MSG = [{"role": "user", "content": "Say hi to my friend Alice"}]


def key(kid: str, secret: str, **kw) -> ClientKey:
    return ClientKey(id=kid, sha256=hashlib.sha256(secret.encode()).hexdigest(), **kw)


KEYS = (key("alice", "sk-alice", models=("m",)), key("bob", "sk-bob", models=("other",)), key("root", "sk-root"))


async def app_client(aiohttp_client, settings: ServerConfig, fake: FakeRemote | None = None):
    fake = fake or FakeRemote(script(WORDS))
    other = FakeRemote(script(WORDS))
    app = create_app({"m": ServedModel("m", fake), "other": ServedModel("other", other)}, settings, batches=False)
    return await aiohttp_client(app), fake


def chat(max_tokens: int = 3, **kw) -> dict:
    return {"model": "m", "messages": MSG, "max_tokens": max_tokens, "temperature": 0, **kw}


# ----------------------------------------------------------------------------- auth
async def test_no_key_wrong_key_and_other_models_key_reach_nothing(aiohttp_client):
    client, fake = await app_client(aiohttp_client, ServerConfig(keys=KEYS))
    r = await client.post("/v1/chat/completions", json=chat())
    body = await r.json()
    assert r.status == 401 and body["error"]["type"] == "invalid_request_error" and body["error"]["code"] is None
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-wrong"})
    body = await r.json()
    assert r.status == 401 and body["error"]["code"] == "invalid_api_key"
    assert "sk-wrong" not in json.dumps(body)  # the key is never echoed
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Basic sk-alice"})
    assert r.status == 401
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-bob"})
    body = await r.json()
    assert r.status == 403 and body["error"]["code"] == "model_not_allowed" and body["error"]["param"] == "model"
    r = await client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert r.status == 401
    for path in ("/v1/files", "/v1/batches"):  # shared by unrestricted keys only
        r = await client.get(path, headers={"Authorization": "Bearer sk-alice"})
        assert r.status == 403 and (await r.json())["error"]["code"] == "model_not_allowed"
    assert fake.calls == 0
    # operators' routes need no key
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_right_key_through_the_openai_client(aiohttp_client):
    client, fake = await app_client(aiohttp_client, ServerConfig(keys=KEYS))
    base = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-alice", max_retries=0) as oa:
        r = await oa.chat.completions.create(model="m", messages=MSG, max_tokens=3, temperature=0)
        assert r.choices[0].message.content == "Hi there,"
        assert [m.id for m in (await oa.models.list()).data] == ["m"]  # only the key's models
        with pytest.raises(openai.NotFoundError):
            await oa.models.retrieve("other")
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-nope", max_retries=0) as oa:
        with pytest.raises(openai.AuthenticationError):
            await oa.chat.completions.create(model="m", messages=MSG, max_tokens=3)
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-root", max_retries=0) as oa:
        assert sorted(m.id for m in (await oa.models.list()).data) == ["m", "other"]
    assert fake.calls == 1  # one speculative draft for the allowed request; the refused one never reached it


def test_config_keys_are_validated_by_name(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        textwrap.dedent(
            f"""
            [[server.keys]]
            id = "a"
            sha256 = "{"0" * 64}"
            models = ["nope"]
            [models.m]
            backend = "llama-inprocess"
            gguf = "smollm2"
            """
        )
    )
    with pytest.raises(ConfigError, match=r"server\.keys \(id a\)\.models: no served model named 'nope'"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace('models = ["nope"]', "").replace('"0000', '"ZZ00'))
    with pytest.raises(ConfigError, match=r"server\.keys\.0\.sha256"):
        load_config(cfg)
    with pytest.raises(ValueError, match="id a appears more than once"):
        ServerConfig(keys=(key("a", "x"), key("a", "y")))
    with pytest.raises(ValueError, match="a and b have the same sha256"):
        ServerConfig(keys=(key("a", "x"), key("b", "x")))
    with pytest.raises(ValueError, match="at least 1 item"):
        key("a", "x", models=())


def test_hash_key_quotes_names_as_toml(capsys):
    names = ['we"ird', "back\\slash"]
    assert cli(["hash-key", "--id", "x", "--models", ",".join(names)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["server"]["keys"][0]["models"] == names


def test_hash_key_prints_an_entry_that_authenticates(capsys):
    assert cli(["hash-key", "--id", "team-a", "--models", "m,other"]) == 0
    out = capsys.readouterr().out
    secret = out.split("give it to the client): ", 1)[1].split()[0]
    entry = tomllib.loads(out)["server"]["keys"][0]
    parsed = ClientKey(**entry)
    assert parsed.id == "team-a" and parsed.models == ("m", "other")
    assert parsed.sha256 == hashlib.sha256(secret.encode()).hexdigest() and len(secret) > 40


# ----------------------------------------------------------------------------- limits
async def test_requests_per_minute_gives_429_with_retry_after(aiohttp_client):
    keys = (key("alice", "sk-alice", rpm=2),)
    client, fake = await app_client(aiohttp_client, ServerConfig(keys=keys))
    auth = {"Authorization": "Bearer sk-alice"}
    for _ in range(2):
        assert (await client.post("/v1/chat/completions", json=chat(), headers=auth)).status == 200
    r = await client.post("/v1/chat/completions", json=chat(), headers=auth)
    body = await r.json()
    assert r.status == 429 and body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert fake.calls == 2  # one speculative draft per answered request


async def test_concurrent_requests_per_key_are_bounded(aiohttp_client):
    gate, entered = asyncio.Event(), asyncio.Event()
    fake = FakeRemote(script(WORDS))
    draft = fake.draft

    async def slow_draft(*a, **kw):
        entered.set()
        await gate.wait()
        return await draft(*a, **kw)

    fake.draft = slow_draft  # type: ignore[method-assign]
    client, _ = await app_client(aiohttp_client, ServerConfig(key_max_concurrent=1), fake)
    first = asyncio.create_task(client.post("/v1/chat/completions", json=chat()))
    await asyncio.wait_for(entered.wait(), 10)
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status == 429 and r.headers["Retry-After"] == "1"
    gate.set()
    assert (await first).status == 200
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200  # the slot was given back


# ----------------------------------------------------------------------------- request id, metrics, readiness
async def test_request_id_is_returned_and_taken_from_the_client(aiohttp_client):
    client, _ = await app_client(aiohttp_client, ServerConfig())
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.headers["X-Request-Id"].startswith("req_")
    r = await client.post("/v1/chat/completions", json=chat(stream=True), headers={"X-Request-Id": "trace-42"})
    assert r.headers["X-Request-Id"] == "trace-42"
    await r.read()
    r = await client.post("/v1/chat/completions", json=chat(), headers={"X-Request-Id": "bad id\u00e9<script>"})
    assert r.headers["X-Request-Id"].startswith("req_")
    r = await client.post("/v1/chat/completions", data=b"{not json")
    assert r.status == 400 and r.headers["X-Request-Id"].startswith("req_")


async def test_metrics_count_requests_tokens_and_upstream_errors(aiohttp_client):
    fake = FakeRemote(script(WORDS))
    client, _ = await app_client(aiohttp_client, ServerConfig(keys=KEYS), fake)
    auth = {"Authorization": "Bearer sk-alice"}
    assert (await client.post("/v1/chat/completions", json=chat(3), headers=auth)).status == 200
    r = await client.post("/v1/chat/completions", json=chat(2, stream=True), headers=auth)
    await r.read()
    fake.steps = lambda prefix: (_ for _ in ()).throw(RemoteUnavailable("upstream down"))
    assert (await client.post("/v1/chat/completions", json=chat(), headers=auth)).status == 503
    assert (await client.post("/v1/chat/completions", json=chat())).status == 401
    text = await (await client.get("/metrics")).text()
    assert 'deltaproxy_requests_total{key="-",model="-",status="401"} 1.0' in text  # refused ones count too
    assert 'deltaproxy_requests_total{key="alice",model="m",status="200"} 2.0' in text
    assert 'deltaproxy_requests_total{key="alice",model="m",status="503"} 1.0' in text
    assert 'deltaproxy_completion_tokens_total{model="m"} 5.0' in text
    assert 'deltaproxy_upstream_errors_total{kind="upstream_unavailable"} 1.0' in text
    assert 'deltaproxy_time_to_first_token_seconds_count{model="m"} 1.0' in text
    assert 'deltaproxy_remote_calls_per_request_sum{model="m"} 2.0' in text  # one draft per answered request


async def test_ready_reports_each_upstream(aiohttp_client):
    fake = FakeRemote(script(WORDS))
    client, _ = await app_client(aiohttp_client, ServerConfig(), fake)
    r = await client.get("/ready")
    assert r.status == 200 and (await r.json()) == {"status": "ready", "models": {"m": "ok", "other": "ok"}}
    fake.not_ready = RemoteUnavailable("model 'm': cannot reach the upstream (ConnectError)")
    r = await client.get("/ready")
    body = await r.json()
    assert r.status == 503 and body["status"] == "not_ready" and "cannot reach" in body["models"]["m"]
    assert body["models"]["other"] == "ok"


# ----------------------------------------------------------------------------- audit log
async def test_audit_log_has_one_chained_line_per_request_without_text(aiohttp_client, tmp_path):
    path = tmp_path / "audit" / "log.jsonl"
    client, _ = await app_client(aiohttp_client, ServerConfig(keys=KEYS, audit_log=str(path)))
    auth = {"Authorization": "Bearer sk-alice"}
    assert (await client.post("/v1/chat/completions", json=chat(3), headers=auth)).status == 200
    r = await client.post("/v1/chat/completions", json=chat(2, stream=True), headers=auth)
    await r.read()
    assert (await client.post("/v1/chat/completions", json=chat(n=0), headers=auth)).status == 400
    assert (await client.post("/v1/chat/completions", json=chat(), headers={})).status == 401
    bob = {"Authorization": "Bearer sk-bob"}
    assert (await client.post("/v1/chat/completions", json=chat(), headers=bob)).status == 403
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["status"] for x in lines] == [200, 200, 400, 401, 403]  # refused requests too
    assert lines[3]["key_id"] is None and lines[3]["error"] == "invalid_request_error"
    assert lines[4]["key_id"] == "bob" and lines[4]["model"] == "m" and lines[4]["error"] == "model_not_allowed"
    first = lines[0]
    assert first["prev_sha256"] == GENESIS and first["key_id"] == "alice" and first["model"] == "m"
    assert first["completion_tokens"] == 3 and first["remote_calls"] == 1 and first["alpha"] == 1.0
    assert first["offset_sha256"] is None and first["error"] is None and first["request_id"].startswith("req_")
    assert lines[2]["error"] == "invalid_request_error" and lines[2]["completion_tokens"] == 0
    assert "Alice" not in path.read_text() and "prompt" not in first
    result = verify(path)
    assert result.ok and result.lines == 5


async def test_audit_log_text_when_configured(aiohttp_client, tmp_path):
    path = tmp_path / "log.jsonl"
    client, _ = await app_client(aiohttp_client, ServerConfig(audit_log=str(path), audit_log_text=True))
    assert (await client.post("/v1/chat/completions", json=chat(3))).status == 200
    r = await client.post("/v1/chat/completions", json=chat(2, stream=True))
    await r.read()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["prompt"] == MSG and lines[0]["output"] == ["Hi there,"]
    assert lines[1]["output"] == ["Hi there"]


def _write_log(path, n: int) -> list[bytes]:
    log = AuditLog(path)
    for i in range(n):
        log.append({"request_id": f"r{i}", "status": 200})
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def test_verify_detects_an_edited_or_removed_line(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    lines = _write_log(path, 5)
    assert cli(["verify-log", str(path)]) == 0
    head = capsys.readouterr().out.split("sha256 ")[1].strip()
    assert verify(path, expected_head=head).ok

    path.write_bytes(b"".join(lines[:2] + [lines[2].replace(b'"r2"', b'"rX"')] + lines[3:]))
    result = verify(path)
    assert not result.ok and result.bad_line == 4 and result.lines == 3 and "line 3 was edited" in result.error
    assert cli(["verify-log", str(path)]) == 1

    path.write_bytes(b"".join(lines[:1] + lines[2:]))
    assert verify(path).bad_line == 2
    path.write_bytes(b"".join(lines[1:]))
    assert verify(path).bad_line == 1
    path.write_bytes(b"".join(lines[:4]))  # the end cut off: only an anchor shows it
    assert verify(path).ok and not verify(path, expected_head=head).ok
    path.write_bytes(b"".join(lines))
    assert verify(path, expected_head=head.upper()).ok
    path.write_bytes(b"".join(lines) + b"[" * 100000 + b"\n")
    assert verify(path).bad_line == 6


def test_a_crash_mid_line_is_cut_at_reopen_and_the_chain_goes_on(tmp_path):
    path = tmp_path / "log.jsonl"
    _write_log(path, 3)
    with path.open("ab") as f:
        f.write(b'{"request_id":"half')
    assert verify(path).ok and verify(path).incomplete_tail_bytes == 19
    log = AuditLog(path)
    with pytest.raises(AuditLogError, match="in use by another process"):
        AuditLog(path)
    log.append({"request_id": "after"})
    log.close()
    result = verify(path)
    assert result.ok and result.lines == 5 and result.incomplete_tail_bytes == 0
    event = json.loads(path.read_text().splitlines()[3])  # written when the log was opened
    assert event["event"] == "recovered_incomplete_line" and event["truncated_bytes"] == 19


def test_a_failed_write_is_undone_and_the_chain_goes_on(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    log = AuditLog(path)
    log.append({"i": 0})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:20]))  # a full disk: a short write
    with pytest.raises(AuditLogError, match="short write"):
        log.append({"i": 1, "pad": "x" * 100})
    monkeypatch.setattr(os, "write", real_write)
    log.append({"i": 2})
    log.close()
    result = verify(path)
    assert result.ok and result.lines == 2


WRITER = """
import sys
from proxy.gateway.request_log import AuditLog
log = AuditLog(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    log.append({"request_id": f"r{i}", "status": 200, "pad": "x" * (i % 300)})
    i += 1
"""


def test_kill_9_while_writing_leaves_a_log_that_verifies(tmp_path):
    path = tmp_path / "log.jsonl"
    for _ in range(3):  # three crashes, each reopened by the next writer
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, cwd=os.getcwd())
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        result = verify(path)
        assert result.ok, result.error
        for line in path.read_bytes().split(b"\n")[:-1]:
            json.loads(line)
    assert result.lines > 100


async def test_ready_asks_real_http_upstreams(aiohttp_client, aiohttp_server):
    from conftest import free_port

    from adapters.openai_chat import ChatAdapter
    from adapters.profiles import VLLM
    from bench.fake_upstream import create_app as fake_upstream

    up = await aiohttp_server(fake_upstream())
    live = ChatAdapter(profile=VLLM, name="live", base_url=str(up.make_url("/v1")), model="fake", api_key=None)
    dead = ChatAdapter(
        profile=VLLM, name="dead", base_url=f"http://127.0.0.1:{free_port()}/v1", model="fake", api_key=None
    )
    app = create_app({"live": ServedModel("live", live), "dead": ServedModel("dead", dead)}, batches=False)
    client = await aiohttp_client(app)
    r = await client.get("/ready")
    body = await r.json()
    assert r.status == 503 and body["models"]["live"] == "ok" and "cannot reach the upstream" in body["models"]["dead"]


def test_hash_key_and_verify_log_start_without_torch(tmp_path):
    """The small commands import only what they use: no torch (seconds of start-up and
    hundreds of MB) for ``hash-key`` or ``verify-log``."""
    code = (
        "import sys; from proxy.cli.main import main; "
        f"main(['hash-key', '--id', 'a']); main(['verify-log', {str(tmp_path / 'none.jsonl')!r}]); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr
