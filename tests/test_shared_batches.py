"""Batches shared by replicas (``server.batch_storage``: records and leases in Redis, bytes
in a shared ``data_dir``): a batch created on one replica is seen on the other, runs on
one of them at a time, and is taken over line by line, with no line lost or written twice,
when its replica stops renewing its lease; a cancel asked on the other replica reaches it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
from aiohttp.test_utils import TestServer
from test_batch_api import SlowRemote, _line, _lines, _wait

from proxy.config import ServerConfig
from proxy.decoding.served import ServedModel
from proxy.server.app import create_app
from proxy.server.files_batches import BATCHES


async def _replica(data: Path, redis_url: str, name: str, delay: float) -> tuple[TestServer, openai.AsyncOpenAI]:
    settings = ServerConfig(
        data_dir=str(data), batch_storage=redis_url, batch_lease_seconds=1.0, replica=name, batch_concurrency=2
    )
    server = TestServer(create_app({"m": ServedModel("m", SlowRemote(delay), speculative=False)}, settings))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)
    return server, client


def _die(server: TestServer) -> None:
    """Stop a replica's batch work as a SIGKILL would: no lease released, no record written."""
    service = server.app[BATCHES].service
    if service._watcher is not None:
        service._watcher.cancel()
    for task in list(service.tasks.values()):
        task.cancel()


async def test_a_batch_whose_replica_dies_completes_on_the_other(tmp_path, redis_url):
    url = redis_url.replace("/0", "/2")
    (a, ca), (b, cb) = await _replica(tmp_path, url, "a", 0.05), await _replica(tmp_path, url, "b", 0.05)
    try:
        f = await ca.files.create(
            file=("in.jsonl", "\n".join(_line(str(i)) for i in range(24)).encode()), purpose="batch"
        )
        batch = await ca.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert (await cb.files.retrieve(f.id)).id == f.id  # the other replica sees the records
        assert [x.id for x in (await cb.batches.list()).data] == [batch.id]
        for _ in range(200):  # some lines done on a, not all
            done = (await cb.batches.retrieve(batch.id)).request_counts
            if done is not None and done.completed >= 4:
                break
            await asyncio.sleep(0.05)
        assert batch.id in a.app[BATCHES].service.tasks and batch.id not in b.app[BATCHES].service.tasks
        _die(a)
        final = await _wait(cb, batch.id, timeout=60)
        assert final.status == "completed", final.errors
        assert batch.id not in a.app[BATCHES].service.tasks
        out = _lines((await cb.files.content(final.output_file_id)).content)
        assert sorted(int(o["custom_id"]) for o in out) == list(range(24))  # none lost, none twice
        assert final.request_counts is not None and final.request_counts.completed == 24
    finally:
        for s in (a, b):
            await s.close()


async def test_a_cancel_asked_on_the_other_replica_reaches_the_running_one(tmp_path, redis_url):
    url = redis_url.replace("/0", "/3")
    (a, ca), (b, cb) = await _replica(tmp_path, url, "a", 0.1), await _replica(tmp_path, url, "b", 0.1)
    try:
        f = await ca.files.create(
            file=("in.jsonl", "\n".join(_line(str(i)) for i in range(40)).encode()), purpose="batch"
        )
        batch = await ca.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        await asyncio.sleep(0.5)
        cancelling = await cb.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        final = await _wait(cb, batch.id, timeout=30)
        assert final.status == "cancelled"
        assert final.request_counts is not None and final.request_counts.completed < 40
    finally:
        for s in (a, b):
            await s.close()


async def test_a_batch_storage_that_does_not_answer_is_a_503(tmp_path):
    from conftest import free_port

    settings = ServerConfig(data_dir=str(tmp_path), batch_storage=f"redis://127.0.0.1:{free_port()}/0")
    server = TestServer(create_app({"m": ServedModel("m", SlowRemote(0))}, settings))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)
    try:
        for call in (
            client.batches.list(),
            client.files.create(file=("a.jsonl", _line("a").encode()), purpose="batch"),
        ):
            try:
                await call
                raise AssertionError("no error")
            except openai.APIStatusError as exc:
                assert exc.status_code == 503 and exc.body["code"] == "storage_unavailable"
        assert list((tmp_path / "files").iterdir()) == []  # the upload's bytes were not kept
        ready = await client._client.get(str(server.make_url("/ready")))
        assert ready.status_code == 503 and "does not answer" in ready.json()["batch_storage"]
    finally:
        await server.close()


def test_replicas_that_do_not_share_data_dir_are_told_and_names_never_share_a_lease(tmp_path, redis_url):
    import pytest

    from proxy.server.batch_service import BatchService
    from proxy.server.batch_store_redis import RedisBatchStore

    url = redis_url.replace("/0", "/4")
    first, same, other = (RedisBatchStore(url, tmp_path / d) for d in ("shared", "shared", "elsewhere"))
    first.check()
    same.check()  # the same folder: fine
    with pytest.raises(RuntimeError, match="not the folder the other replicas use"):
        other.check()
    services = [BatchService(first, runner=None, owner="a") for _ in range(2)]  # type: ignore[arg-type]
    assert services[0].owner.startswith("a:") and services[0].owner != services[1].owner
    assert first.acquire("batch_x", services[0].owner, 5000) and not first.acquire("batch_x", services[1].owner, 5000)


def test_a_redis_url_redis_py_cannot_use_is_a_config_error():
    import pytest

    from proxy.config import ServerConfig

    for key in ("limits_storage", "batch_storage"):
        with pytest.raises(ValueError, match=key):
            ServerConfig(**{key: "redis://127.0.0.1:6379/1?foo=bar"})


async def test_a_finished_batch_leaves_no_work_file(tmp_path, redis_url):
    server, client = await _replica(tmp_path, redis_url.replace("/0", "/5"), "a", 0.0)
    try:
        f = await client.files.create(file=("in.jsonl", _line("a").encode()), purpose="batch")
        batch = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert (await _wait(client, batch.id)).status == "completed"
    finally:
        await server.close()
    assert list((tmp_path / "work").iterdir()) == []
