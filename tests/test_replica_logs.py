"""Replicas behind one address each keep a hash chain of their own (``server.replica``,
``{replica}`` in ``server.audit_log``): every line names its replica, and
``deltaproxy verify-log`` checks the chains together, finds a broken one, and finds lines
that moved between them."""

from __future__ import annotations

import json

import httpx
from aiohttp.test_utils import TestServer
from fakes import FakeRemote, script

from proxy.cli.main import main as cli
from proxy.config import ServerConfig
from proxy.decoding.served import ServedModel
from proxy.server.app import create_app

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


async def test_each_replica_writes_its_own_chain_and_they_verify_together(tmp_path, capsys):
    pattern = str(tmp_path / "audit-{replica}.jsonl")
    servers = []
    for name in ("a", "b"):
        app = create_app(
            {"m": ServedModel("m", FakeRemote(script(["One"])))},
            ServerConfig(audit_log=pattern, replica=name),
            batches=False,
        )
        servers.append(TestServer(app))
        await servers[-1].start_server()
    ids = []
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(10):
                r = await http.post(str(servers[i % 2].make_url("/v1/chat/completions")), json=BODY)
                assert r.status_code == 200
                ids.append(r.headers["X-Request-Id"])
    finally:
        for s in servers:
            await s.close()
    files = [tmp_path / "audit-a.jsonl", tmp_path / "audit-b.jsonl"]
    lines = {f.name: [json.loads(x) for x in f.read_text().splitlines()] for f in files}
    assert {x["replica"] for x in lines["audit-a.jsonl"]} == {"a"} and {
        x["replica"] for x in lines["audit-b.jsonl"]
    } == {"b"}
    assert sorted(x["request_id"] for f in lines.values() for x in f) == sorted(ids)  # none missing, none twice
    assert cli(["verify-log", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "audit-a.jsonl: 5 lines (replica a)" in out and "audit-b.jsonl: 5 lines (replica b)" in out

    # a line copied from one chain into the other: its chain breaks, and two replicas share a file
    moved = files[1].read_text().splitlines()[0]
    with open(files[0], "a") as f:
        f.write(moved + "\n")
    assert cli(["verify-log", *map(str, files)]) == 1
    err = capsys.readouterr().err
    assert "audit-a.jsonl: line 6" in err and "several replicas" in err
    assert cli(["verify-log", *map(str, files), "--head", "0" * 64]) == 2


async def test_without_a_replica_name_the_host_name_fills_the_pattern(tmp_path):
    import socket

    app = create_app(
        {"m": ServedModel("m", FakeRemote(script(["One"])))},
        ServerConfig(audit_log=str(tmp_path / "audit-{replica}.jsonl")),
        batches=False,
    )
    server = TestServer(app)
    await server.start_server()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await http.post(str(server.make_url("/v1/chat/completions")), json=BODY)).status_code == 200
    finally:
        await server.close()
    path = tmp_path / f"audit-{socket.gethostname()}.jsonl"
    assert json.loads(path.read_text().splitlines()[0])["replica"] == socket.gethostname()
