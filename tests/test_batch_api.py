"""OpenAI's Files and Batches endpoints (issue 7): the official SDK's round trip,
bad lines in the error file, a restarted server resumes its batches."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import openai
import pytest
from aiohttp.test_utils import TestServer
from fakes import FakeRemote, script

from proxy.config import ServerConfig
from proxy.decoding.served import ServedModel
from proxy.server.app import create_app


def _line(cid: str, content: str = "hi") -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 5, "temperature": 0}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})


class SlowRemote(FakeRemote):
    """A remote that takes ``delay`` seconds per step."""

    def __init__(self, delay: float) -> None:
        super().__init__(script(["One", " two", " three"]))
        self.delay = delay

    async def draft(self, ctx, **kw):
        await asyncio.sleep(self.delay)
        return await super().draft(ctx, **kw)


async def _serve(data_dir: Path, delay: float = 0.0, api_key: str = "none", **settings):
    model = ServedModel("m", SlowRemote(delay), speculative=False)  # a remote call, and its delay, per token
    config = ServerConfig(data_dir=str(data_dir), batch_concurrency=2, **settings)
    server = TestServer(create_app({"m": model}, config))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=api_key, max_retries=0)
    return server, client


async def _wait(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 30.0):
    for _ in range(int(timeout / 0.05)):
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled"):
            return batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch still {batch.status}")


def _lines(content: bytes) -> list[dict]:
    return [json.loads(x) for x in content.splitlines() if x.strip()]


async def test_openai_sdk_batch_round_trip(tmp_path: Path):
    server, client = await _serve(tmp_path)
    try:
        data = "\n".join([_line("a"), _line("b", "yo"), '{"custom_id": "c", "url": "/v1/chat/completions"}', "nope"])
        f = await client.files.create(file=("in.jsonl", data.encode()), purpose="batch")
        assert f.object == "file" and f.purpose == "batch" and f.bytes == len(data.encode())
        assert f.filename == "in.jsonl"
        batch = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "t"}
        )
        assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "t"}
        batch = await _wait(client, batch.id)
        assert batch.status == "completed"
        assert batch.request_counts is not None
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 2, 2)
        assert batch.completed_at is not None and batch.in_progress_at is not None
        assert batch.output_file_id and batch.error_file_id
        out = _lines((await client.files.content(batch.output_file_id)).content)
        assert sorted(o["custom_id"] for o in out) == ["a", "b"]
        assert all(o["response"]["status_code"] == 200 for o in out)
        assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "One two three"
        errors = _lines((await client.files.content(batch.error_file_id)).content)
        assert sorted((e["custom_id"] or "", e["error"]["line"]) for e in errors) == [("", 4), ("c", 3)]
        assert (await client.files.retrieve(batch.output_file_id)).purpose == "batch_output"
        listed = await client.batches.list()
        assert [b.id for b in listed.data] == [batch.id]
        assert {x.id for x in (await client.files.list()).data} >= {f.id, batch.output_file_id}
        assert (await client.files.delete(f.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(f.id)
    finally:
        await client.close()
        await server.close()


async def test_bad_requests_get_openai_errors(tmp_path: Path):
    server, client = await _serve(tmp_path)
    try:
        with pytest.raises(openai.NotFoundError):
            await client.batches.create(
                input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
            )
        f = await client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
        with pytest.raises(openai.BadRequestError) as e:
            await client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        assert e.value.body["param"] == "endpoint"
        with pytest.raises(openai.BadRequestError) as e:
            await client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
        assert e.value.body["param"] == "completion_window"
        with pytest.raises(openai.BadRequestError) as e:
            await client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
        assert e.value.body["param"] == "purpose"
        with pytest.raises(openai.NotFoundError):
            await client.batches.retrieve("batch_nope")
        raw = await client.post("/files", body={"purpose": "batch"}, cast_to=object)  # not multipart
    except openai.BadRequestError as exc:
        assert exc.body["param"] == "file"
    else:
        raise AssertionError(f"a JSON upload was accepted: {raw}")
    finally:
        await client.close()
        await server.close()
    assert not list((tmp_path / "files").glob(".upload-*"))  # refused uploads leave nothing


async def test_a_restarted_server_resumes_its_batch_and_loses_no_line(tmp_path: Path):
    n = 30
    server, client = await _serve(tmp_path, delay=0.02)
    data = "".join(_line(f"r{i}") + "\n" for i in range(n)).encode()
    f = await client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(400):  # stop once a few lines are done
        b = await client.batches.retrieve(batch.id)
        if b.request_counts and b.request_counts.completed >= 3:
            break
        await asyncio.sleep(0.05)
    await client.close()
    await server.close()  # shutdown in the middle of the batch
    work = (tmp_path / "work" / f"{batch.id}.jsonl").read_bytes()
    assert 0 < len(work.splitlines()) < n
    server, client = await _serve(tmp_path)
    try:
        b = await _wait(client, batch.id)
        assert b.status == "completed"
        out = _lines((await client.files.content(b.output_file_id)).content)
        assert sorted(o["custom_id"] for o in out) == sorted(f"r{i}" for i in range(n))
        assert b.error_file_id is None
    finally:
        await client.close()
        await server.close()


async def test_cancel_keeps_the_finished_lines(tmp_path: Path):
    server, client = await _serve(tmp_path, delay=0.05)
    try:
        data = "".join(_line(f"r{i}") + "\n" for i in range(40)).encode()
        f = await client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await asyncio.sleep(0.5)
        c = await client.batches.cancel(batch.id)
        assert c.status in ("cancelling", "cancelled")
        b = await _wait(client, batch.id)
        assert b.status == "cancelled" and b.cancelled_at is not None
        out = _lines((await client.files.content(b.output_file_id)).content) if b.output_file_id else []
        assert 0 < len(out) < 40 and b.request_counts.completed == len(out)
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(batch.id)
    finally:
        await client.close()
        await server.close()


async def test_batch_lines_are_audited_and_counted_like_requests(tmp_path: Path):
    """Each line has its audit line, naming the client key that created the batch (which the
    batch object itself does not show)."""
    import hashlib

    from proxy.config import ClientKey
    from proxy.gateway.request_log import verify

    audit = tmp_path / "audit.jsonl"
    ops = ClientKey(id="ops", sha256=hashlib.sha256(b"sk-ops").hexdigest())
    server, client = await _serve(tmp_path / "data", api_key="sk-ops", audit_log=str(audit), keys=(ops,))
    try:
        data = (
            "\n".join([_line("a"), _line("b", "yo")])
            + "\n"
            + json.dumps(
                {
                    "custom_id": "c",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "nope", "messages": []},
                }
            )
        )
        f = await client.files.create(file=("in.jsonl", data.encode()), purpose="batch")
        batch = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert (await _wait(client, batch.id)).status == "completed"
        shown = [
            (await client.batches.with_raw_response.retrieve(batch.id)).http_response.json(),
            (await client.batches.with_raw_response.list()).http_response.json()["data"][0],
        ]
        assert all(set(b) == set(shown[0]) and "_key_id" not in b and b["id"] == batch.id for b in shown)
        lines = [json.loads(x) for x in audit.read_text().splitlines() if json.loads(x)["endpoint"].startswith("batch")]
        assert {x["key_id"] for x in lines} == {"ops"}
        assert sorted(x["status"] for x in lines) == [200, 200, 400]
        assert {x["endpoint"] for x in lines} == {"batch /v1/chat/completions"}
        assert sum(x["completion_tokens"] for x in lines) == 8 and verify(audit).ok  # 3 words + end of turn, twice
    finally:
        await client.close()
        await server.close()


async def test_a_lone_surrogate_is_a_400_or_one_failed_line_never_a_500(tmp_path: Path):
    """JSON escapes can carry a lone surrogate (``\\ud800``) that UTF-8 cannot encode: in a
    request's model it is a 400 naming the field; in one batch line it fails that line and
    the others are answered; the escaped id comes back as it was sent."""
    import httpx

    server, client = await _serve(tmp_path, audit_log=str(tmp_path / "audit.jsonl"))
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url("/v1"))) as http:
            for path, rest in (
                ("/chat/completions", '"messages": [{"role": "user", "content": "hi"}]'),
                ("/completions", '"prompt": "hi"'),
            ):
                body = '{"model": "m\\udc00", ' + rest + "}"
                r = await http.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        good = _line("a")
        odd_id = _line("b").replace('"custom_id": "b"', '"custom_id": "b\\ud800"')
        odd_model = _line("c").replace('"model": "m"', '"model": "m\\udc00"')
        f = await client.files.create(file=("in.jsonl", "\n".join([good, odd_id, odd_model]).encode()), purpose="batch")
        batch = await client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        batch = await _wait(client, batch.id)
        assert batch.status == "completed", batch.errors
        out = _lines((await client.files.content(batch.output_file_id)).content)
        errors = _lines((await client.files.content(batch.error_file_id)).content)
        assert sorted(o["custom_id"] for o in out) == ["a", "b\ud800"]
        assert [e["custom_id"] for e in errors] == ["c"] and errors[0]["response"]["status_code"] == 400
    finally:
        await server.close()
    from proxy.gateway.request_log import verify

    assert verify(tmp_path / "audit.jsonl").ok


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"no boundary"),
        (
            "multipart/form-data; boundary=zz",
            b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n{}',
        ),
        (
            "multipart/form-data; boundary=qq",
            b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--zz--\r\n',
        ),
        (
            "multipart/form-data; boundary=zz",
            b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\nContent-Type: text/plain; charset=bogus\r\n\r\n'
            b"batch\r\n--zz--\r\n",
        ),
        (
            "multipart/form-data; boundary=zz",
            b'--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n\xff\r\n--zz--\r\n',
        ),
        (
            "multipart/form-data; boundary=zz",
            b'--zz\r\nContent-Disposition: form-data; name="D\x16\x12NX\xf3"\r\n\r\nx\r\n--zz--\r\n',
        ),
    ],
)
async def test_malformed_uploads_are_400s_and_leave_no_file(tmp_path: Path, content_type: str, body: bytes):
    import httpx

    server, _ = await _serve(tmp_path)
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url("/v1"))) as http:
            r = await http.post("/files", content=body, headers={"content-type": content_type})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    finally:
        await server.close()
    assert list((tmp_path / "files").iterdir()) == []


async def test_an_upload_named_in_invalid_utf8_is_kept_under_a_readable_name(tmp_path: Path):
    import httpx

    server, client = await _serve(tmp_path)
    body = (
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="\xff\xfe.jsonl"\r\n\r\n'
        + _line("a").encode()
        + b'\r\n--zz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--zz--\r\n'
    )
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url("/v1"))) as http:
            r = await http.post("/files", content=body, headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 200, r.text
        assert r.json()["filename"].endswith(".jsonl")
        listed = await client.files.list()
        assert [f.id for f in listed.data] == [r.json()["id"]]
    finally:
        await server.close()


async def test_a_running_batchs_input_cannot_be_deleted_and_listing_keeps_creation_order(tmp_path: Path):
    server, client = await _serve(tmp_path, delay=0.05)
    try:
        f = await client.files.create(
            file=("in.jsonl", "\n".join(_line(str(i)) for i in range(6)).encode()), purpose="batch"
        )
        slow = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.APIStatusError) as err:
            await client.files.delete(f.id)
        assert err.value.status_code == 409 and err.value.body["code"] == "file_in_use"
        g = await client.files.create(file=("in2.jsonl", _line("x").encode()), purpose="batch")
        quick = await client.batches.create(
            input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await _wait(client, quick.id)
        await _wait(client, slow.id)  # its record was updated last
        first = await client.batches.list(limit=1)
        assert [b.id for b in first.data] == [quick.id]
        second = await client.batches.list(limit=1, after=quick.id)
        assert [b.id for b in second.data] == [slow.id]
        assert (await client.files.delete(f.id)).deleted
        with pytest.raises(openai.NotFoundError) as missing:
            await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert missing.value.body["param"] == "input_file_id"
    finally:
        await server.close()
