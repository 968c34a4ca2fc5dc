"""Batch runs (issue 7): OpenAI's Batch format, bad lines answered with their
own error line, resumable without losing or repeating a line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeRemote, script

from proxy.decoding.served import ServedModel
from proxy.jobs.batch import BatchInputError, BatchRunner, iter_output, parse_lines


def _line(cid: str, content: str = "hi", **body) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 5, "temperature": 0, **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})


def _runner() -> BatchRunner:
    return BatchRunner({"m": ServedModel("m", FakeRemote(script(["One", " two", " three"])))})


async def test_case_008_bad_lines_get_their_own_error_line(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    no_method = json.dumps({"custom_id": "b", "url": "/v1/chat/completions", "body": {}})
    inp.write_text(f"{_line('a')}\n{no_method}\n{{not json\n")
    out = tmp_path / "out.jsonl"
    summary = await _runner().run(inp, out, progress=False)
    assert (summary.total, summary.completed, summary.failed) == (3, 1, 2)
    lines = {(o["custom_id"], (o["error"] or {}).get("line")): o for o in iter_output(out)}
    assert len(lines) == 3
    good = lines[("a", None)]
    assert good["id"].startswith("batch_req_") and good["error"] is None
    assert good["response"]["status_code"] == 200
    assert good["response"]["body"]["choices"][0]["message"]["content"] == "One two three"
    assert good["response"]["body"]["object"] == "chat.completion"
    b = lines[("b", 2)]
    assert b["response"] is None and b["error"]["code"] == "missing_required_parameter"
    assert "method" in b["error"]["message"]
    bad = lines[(None, 3)]
    assert bad["response"] is None and bad["error"]["code"] == "invalid_json"
    assert "line 3" in bad["error"]["message"]
    progress = json.loads((tmp_path / "out.jsonl.progress.json").read_text())
    assert (progress["total"], progress["completed"], progress["failed"]) == (3, 1, 2)


async def test_request_errors_keep_their_status_and_openai_body(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    lines = [
        _line("unknown-model", model="nope"),
        _line("stream", stream=True),
        _line("bad-temperature", temperature=-1),
        json.dumps({"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}}),
        _line("dup"),
        _line("dup"),
        json.dumps(
            {
                "custom_id": "c",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "m", "prompt": "x", "max_tokens": 3},
            }
        ),
    ]
    inp.write_text("\n".join(lines) + "\n\n")  # a blank line is not a line of the batch
    out = tmp_path / "out.jsonl"
    await _runner().run(inp, out, concurrency=3, progress=False)
    got = list(iter_output(out))
    assert len(got) == 8
    by_id = {}
    for o in got:
        by_id.setdefault(o["custom_id"], []).append(o)
    assert by_id["unknown-model"][0]["response"]["status_code"] == 404
    assert by_id["unknown-model"][0]["response"]["body"]["error"]["code"] == "model_not_found"
    assert by_id["stream"][0]["response"]["status_code"] == 400
    assert by_id["stream"][0]["response"]["body"]["error"]["param"] == "stream"
    assert by_id["bad-temperature"][0]["response"]["status_code"] == 400
    assert by_id["url"][0]["error"]["code"] == "invalid_url"
    assert by_id["get"][0]["error"]["code"] == "invalid_method"
    dup = sorted(by_id["dup"], key=lambda o: o["response"] is None)
    assert dup[0]["response"]["status_code"] == 200 and dup[1]["error"]["code"] == "duplicate_custom_id"
    assert by_id["c"][0]["response"]["body"]["object"] == "text_completion"


class Interrupted(Exception):
    pass


async def test_an_interrupted_run_resumes_without_losing_or_repeating_a_line(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(_line(f"r{i}", f"q{i}") + "\n" for i in range(40)) + "{broken\n")
    out = tmp_path / "out.jsonl"

    def stop_after(n: int):
        def hook(summary):
            if summary.completed + summary.failed >= n:
                raise Interrupted

        return hook

    with pytest.raises(Interrupted):
        await _runner().run(inp, out, concurrency=4, progress=False, on_line=stop_after(13))
    first = list(iter_output(out))
    assert len(first) == 13
    with open(out, "ab") as f:  # killed in the middle of a write
        f.write(b'{"id": "batch_req_x", "custom_id": "r3')
    summary = await _runner().run(inp, out, concurrency=4, progress=False)
    assert summary.skipped == 13 and summary.total == 41
    final = list(iter_output(out))
    assert len(final) == 41
    ids = [o["custom_id"] or f"line{o['error']['line']}" for o in final]
    assert sorted(ids) == sorted([f"r{i}" for i in range(40)] + ["line41"])
    assert final[:13] == first  # what was written is kept as it was
    again = await _runner().run(inp, out, progress=False)  # a finished run does nothing more
    assert again.skipped == 41 and len(list(iter_output(out))) == 41


async def test_an_output_is_never_continued_from_another_input(tmp_path: Path):
    inp, other, out = tmp_path / "in.jsonl", tmp_path / "other.jsonl", tmp_path / "out.jsonl"
    inp.write_text(_line("a") + "\n")
    other.write_text(_line("b") + "\n")
    await _runner().run(inp, out, progress=False)
    before = out.read_bytes()
    with pytest.raises(BatchInputError, match="another input"):
        await _runner().run(other, out, progress=False)
    assert out.read_bytes() == before
    stray = tmp_path / "stray.jsonl"
    stray.write_text("hello\n")
    with pytest.raises(BatchInputError, match="no progress file"):
        await _runner().run(inp, stray, progress=False)
    assert stray.read_text() == "hello\n"


async def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path: Path):
    """The command line's runs lock their output: the same command started twice would
    otherwise answer every line twice. The refused run leaves no file behind; once the
    first run ends, the output is free again."""
    import asyncio

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(_line(f"r{i}") + "\n" for i in range(20)))
    release = asyncio.Event()
    runner = _runner()
    slow_answer = runner.answer

    async def answer(req, key_id=None):
        await release.wait()
        return await slow_answer(req, key_id)

    runner.answer = answer  # type: ignore[method-assign]
    first = asyncio.ensure_future(runner.run(inp, out, progress=False, exclusive=True))
    await asyncio.sleep(0.2)
    with pytest.raises(BatchInputError, match="being written by another run"):
        await _runner().run(inp, out, progress=False, exclusive=True)
    import fcntl

    fresh = tmp_path / "fresh.jsonl"
    lock = open(fresh, "wb")  # noqa: SIM115 - another process's lock on a new output
    fcntl.flock(lock, fcntl.LOCK_EX)
    with pytest.raises(BatchInputError, match="being written by another run"):
        await _runner().run(inp, fresh, progress=False, exclusive=True)
    assert not (tmp_path / "fresh.jsonl.progress.json").exists()
    lock.close()
    release.set()
    summary = await first
    assert summary.completed == 20 and len(list(iter_output(out))) == 20
    again = await _runner().run(inp, out, progress=False, exclusive=True)
    assert again.skipped == 20


def test_parse_lines_names_each_fault():
    items = parse_lines(
        b'[1]\n{"custom_id": 3}\n{"custom_id": "x", "method": "POST"}\n'
        b'{"custom_id": "y", "method": "POST", "url": "/v1/completions", "body": 1}\n'
        b'{"custom_id": "z", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}\n'
    )
    codes = [getattr(i, "code", None) for i in items]
    assert codes == [
        "invalid_json",
        "missing_required_parameter",
        "missing_required_parameter",
        "missing_required_parameter",
        "invalid_request",
    ]
    assert [i.line for i in items] == [1, 2, 3, 4, 5]
