"""Streamed drafts of a raw ``/v1/completions`` remote (llama.cpp's and vLLM's servers) and of
vLLM's chat endpoint, through a mock transport that answers with their server-sent events as
the openai SDK's ``Completion`` and ``ChatCompletionChunk`` types shape them (the wire shapes
of llama-cpp-python's and vLLM's streams: one token per chunk with its ``logprobs``, vLLM's
usage in a last chunk without choices when ``stream_options.include_usage`` asks,
llama-cpp-python's never, its prompt counted by ``POST /extras/tokenize/count``, vLLM's by
``POST /tokenize``). Fault injection: a stream cut after some positions, and before any. The
real servers' streams are tested in ``tests/test_llama_server.py`` and ``tests/test_vllm.py``."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest

from adapters.base import Context, RemoteUnavailable
from proxy.config import ModelConfig
from proxy.decoding.types import ChoiceStats, SamplingParams
from proxy.registry import build_model

MSG = ({"role": "user", "content": "Capital of France?"},)
ANSWER = [" The", " capital", " of", " France", " is", " Paris", "."]
ROOT = "http://upstream.test"


def _chat_chunk(token: str | None, finish: str | None = None, k: int = 3) -> dict:
    entry = None
    if token is not None:
        tops = [{"token": token, "logprob": -0.1, "bytes": list(token.encode())}]
        tops += [{"token": f" x{j}", "logprob": -3.0 - j, "bytes": list(f" x{j}".encode())} for j in range(k - 1)]
        entry = {"content": [{"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": tops}]}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": token or ""}, "logprobs": entry, "finish_reason": finish}],
    }


def _chunk(token: str | None, finish: str | None = None, k: int = 3) -> dict:
    lp = None
    if token is not None:
        lp = {
            "tokens": [token],
            "token_logprobs": [-0.1],
            "top_logprobs": [{token: -0.1, **{f" x{j}": -3.0 - j for j in range(k - 1)}}],
            "text_offset": [0],
        }
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": token or "", "logprobs": lp, "finish_reason": finish}],
    }


class _Events(httpx.AsyncByteStream):
    """Server-sent events, optionally cut (a read error) after ``cut`` of them."""

    def __init__(self, events: list[dict], cut: int | None = None, done: bool = True) -> None:
        self.events, self.cut, self.done = events, cut, done

    async def __aiter__(self):
        for i, e in enumerate(self.events):
            if self.cut is not None and i == self.cut:
                raise httpx.ReadError("connection reset by peer")
            yield f"data: {json.dumps(e)}\n\n".encode()
        if self.done:
            yield b"data: [DONE]\n\n"


class StreamingUpstream:
    """Answers a completion request as a stream of the rest of :data:`ANSWER` after the
    prompt's assistant text; ``usage``: vLLM's last usage chunk; ``cut``: per request, where
    its stream breaks off (None: it does not)."""

    def __init__(
        self, *, usage: bool, cuts: list[int | None] | None = None, count_status: int = 200, whole_status: int = 200
    ) -> None:
        self.usage, self.cuts = usage, list(cuts or [])
        self.count_status, self.whole_status = count_status, whole_status
        self.requests: list[httpx.Request] = []

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content)
        if request.url.path in ("/extras/tokenize/count", "/tokenize"):
            if self.count_status != 200:
                return httpx.Response(self.count_status, json={"detail": "Not Found"})
            return httpx.Response(200, json={"count": 17})
        chat = request.url.path.endswith("/chat/completions")
        if chat:
            last = body["messages"][-1]
            done = last["content"] if last["role"] == "assistant" else ""
        else:
            done = body["prompt"].rsplit("<|im_start|>assistant\n", 1)[-1]
        rest, text = [], ""
        for t in ANSWER:
            if len(text) >= len(done):
                rest.append(t)
            text += t
        toks = rest[: body["max_tokens"]]
        make = _chat_chunk if chat else _chunk
        events = [make(t) for t in toks]
        events.append(make(None, "stop" if len(toks) == len(rest) else "length"))
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            n = len(toks)
            events.append(
                {
                    "id": "cmpl-1",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 1,
                    "model": "m",
                    "choices": [],
                    "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n},
                }
            )
        if not body.get("stream"):  # a whole draft (after a stream that broke off)
            if self.whole_status != 200:
                return httpx.Response(self.whole_status, json={"error": {"message": "overloaded"}})
            choice: dict = {
                "index": 0,
                "text": "".join(toks),
                "finish_reason": events[-1]["choices"][0]["finish_reason"],
            }
            choice["logprobs"] = {
                "tokens": toks,
                "token_logprobs": [-0.1] * len(toks),
                "top_logprobs": [e["choices"][0]["logprobs"]["top_logprobs"][0] for e in events[: len(toks)]],
                "text_offset": [0] * len(toks),
            }
            usage = {"prompt_tokens": 9, "completion_tokens": len(toks), "total_tokens": 9 + len(toks)}
            return httpx.Response(
                200,
                json={
                    "id": "c",
                    "object": "text_completion",
                    "created": 1,
                    "model": "m",
                    "choices": [choice],
                    "usage": usage,
                },
            )
        cut = self.cuts.pop(0) if self.cuts else None
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Events(events, cut))

    def client(self) -> openai.DefaultAsyncHttpxClient:
        return openai.DefaultAsyncHttpxClient(transport=httpx.MockTransport(self.handler))


def _model(sampling: str, upstream: StreamingUpstream):
    cfg = ModelConfig(
        backend="openai-completions", base_url=ROOT + "/v1", remote_model="m", template="chatml", sampling=sampling
    )
    model = build_model("m", cfg, http_client=upstream.client())
    model.adapter.retry = type(model.adapter.retry)(attempts=1)
    return model


async def _answer(model, **params) -> tuple[str, ChoiceStats]:
    stats = ChoiceStats()
    pieces = [p async for p in model.generate(Context(messages=MSG), SamplingParams(**params), stats=stats)]
    return "".join(p.text for p in pieces), stats


@pytest.mark.parametrize("sampling", ["vllm", "llama.cpp"])
async def test_a_streamed_draft_gives_the_answer_and_its_usage(sampling):
    upstream = StreamingUpstream(usage=sampling == "vllm")
    model = _model(sampling, upstream)
    assert model.adapter.capabilities.streams_drafts
    text, stats = await _answer(model, max_tokens=32, temperature=0.0)
    assert text == "".join(ANSWER)
    drafts = [b for b in upstream.bodies() if "max_tokens" in b]
    # the answer, then the end of turn (a stream that stops before any token: one position)
    assert len(drafts) == 2 and drafts[1]["prompt"].endswith("".join(ANSWER))
    for body in drafts:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["logprobs"] == model.top_k and body["max_tokens"] > 1
    counted = [r for r in upstream.requests if r.url.path == "/extras/tokenize/count"]
    if sampling == "vllm":
        assert stats.prompt_tokens == 9 and not counted  # the stream's own usage
    else:
        assert stats.prompt_tokens == 17 and len(counted) == 1  # llama-cpp-python's streams report none
        assert json.loads(counted[0].content)["input"] == drafts[0]["prompt"]
    assert stats.remote_calls == 2 and stats.draft_tokens == len(ANSWER) + 1
    await model.aclose()


@pytest.mark.parametrize("usage", [True, False])
async def test_vllm_chat_streams_its_drafts_and_counts_the_messages_where_no_usage_came(usage):
    upstream = StreamingUpstream(usage=usage)
    cfg = ModelConfig(backend="openai-chat", prefill="vllm", base_url=ROOT + "/v1", remote_model="m")
    model = build_model("m", cfg, http_client=upstream.client())
    assert model.adapter.capabilities.streams_drafts
    text, stats = await _answer(model, max_tokens=32, temperature=0.0)
    assert text == "".join(ANSWER)
    drafts = [b for b in upstream.bodies() if "messages" in b and "max_tokens" in b]
    assert len(drafts) == 2 and all(b["stream"] is True and b["logprobs"] is True for b in drafts)
    assert drafts[1]["messages"][-1] == {"role": "assistant", "content": "".join(ANSWER)}
    assert drafts[1]["continue_final_message"] is True and drafts[1]["add_generation_prompt"] is False
    counted = [json.loads(r.content) for r in upstream.requests if r.url.path == "/tokenize"]
    if usage:
        assert stats.prompt_tokens == 9 and not counted
    else:  # the first round's messages, as its request sent them
        assert stats.prompt_tokens == 17 and counted == [{"model": "m", "messages": drafts[0]["messages"]}]
    await model.aclose()


def test_only_servers_whose_prompt_can_be_counted_stream_drafts(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    chat = {
        p: build_model("m", ModelConfig(backend="openai-chat", prefill=p, base_url=ROOT + "/v1", remote_model="m"))
        for p in ("vllm", "llama.cpp", "deepseek")
    }
    assert chat["vllm"].adapter.capabilities.streams_drafts
    assert not chat["llama.cpp"].adapter.capabilities.streams_drafts  # llama-server's count endpoint differs
    assert not chat["deepseek"].adapter.capabilities.streams_drafts  # hosted: a closed stream's usage is lost
    raw = {
        p: build_model(
            "m",
            ModelConfig(
                backend="openai-completions", sampling=p, base_url=ROOT + "/v1", remote_model="m", template="chatml"
            ),
        )
        for p in ("vllm", "llama.cpp", "none")
    }
    assert raw["vllm"].adapter.capabilities.streams_drafts and raw["llama.cpp"].adapter.capabilities.streams_drafts
    assert not raw["none"].adapter.capabilities.streams_drafts


async def test_a_stream_cut_after_some_positions_ends_the_draft_there_and_the_answer_goes_on(caplog):
    upstream = StreamingUpstream(usage=True, cuts=[3])
    model = _model("vllm", upstream)
    text, stats = await _answer(model, max_tokens=32, temperature=0.0)
    assert text == "".join(ANSWER)
    drafts = [b for b in upstream.bodies() if "max_tokens" in b]
    assert len(drafts) == 3  # the second continues after the three positions received
    assert drafts[1]["prompt"].endswith("<|im_start|>assistant\n" + "".join(ANSWER[:3]))
    assert "the draft ends after its 3 positions received" in caplog.text
    await model.aclose()


async def test_a_stream_cut_before_any_position_is_asked_again_whole(caplog):
    upstream = StreamingUpstream(usage=True, cuts=[0])
    model = _model("vllm", upstream)
    text, stats = await _answer(model, max_tokens=32, temperature=0.0)
    assert text == "".join(ANSWER) and stats.prompt_tokens == 9
    drafts = [b for b in upstream.bodies() if "max_tokens" in b]
    assert drafts[0]["stream"] is True and "stream" not in drafts[1]  # the same draft, whole
    assert drafts[1]["prompt"] == drafts[0]["prompt"] and drafts[1]["max_tokens"] == drafts[0]["max_tokens"]
    assert "asked for again, whole" in caplog.text
    await model.aclose()


async def test_a_whole_draft_that_fails_after_a_broken_stream_is_the_remote_unavailable():
    upstream = StreamingUpstream(usage=True, cuts=[0], whole_status=503)
    model = _model("vllm", upstream)
    with pytest.raises(RemoteUnavailable):
        await _answer(model, max_tokens=32, temperature=0.0)
    await model.aclose()


async def test_a_count_that_fails_is_asked_once_and_the_answer_is_whole(caplog):
    upstream = StreamingUpstream(usage=False, count_status=404)
    model = _model("llama.cpp", upstream)
    text, stats = await _answer(model, max_tokens=32, temperature=0.0)
    assert text == "".join(ANSWER) and stats.prompt_tokens is None  # reported as 0
    assert len([r for r in upstream.requests if r.url.path == "/extras/tokenize/count"]) == 1
    assert "the prompt's tokens were not counted" in caplog.text
    await model.aclose()


async def test_one_token_steps_and_a_partial_character_are_whole_drafts():
    upstream = StreamingUpstream(usage=True)
    model = _model("vllm", upstream)
    adapter = model.adapter
    assert await adapter.stream_draft(Context(messages=MSG), n_tokens=1, top_k=5) is None
    partial = Context(messages=MSG, assistant_prefix="é".encode()[:1])
    assert await adapter.stream_draft(partial, n_tokens=8, top_k=5) is None
    assert not upstream.requests
    await model.aclose()


async def test_a_server_whose_streams_carry_no_logprobs_is_asked_whole_from_then_on(caplog):
    """A server that answers a stream request as one JSON body (it ignores ``stream``): the
    draft is asked for again whole, and the model's later drafts are whole."""
    from test_providers import completion_body

    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, json=completion_body(body))

    cfg = ModelConfig(
        backend="openai-completions", base_url=ROOT + "/v1", remote_model="m", template="chatml", sampling="vllm"
    )
    model = build_model("m", cfg, http_client=openai.DefaultAsyncHttpxClient(transport=httpx.MockTransport(handler)))
    text, _ = await _answer(model, max_tokens=8, temperature=0.0)
    assert text == " Paris."
    assert bodies[0].get("stream") is True and all(not b.get("stream") for b in bodies[1:])
    assert not model.adapter.capabilities.streams_drafts
    assert "drafts are asked for whole" in caplog.text
    await model.aclose()
