"""Users' bug reports (001-007) as tests, through the real
openai client against our aiohttp server. 004, 005 and 007 mock the upstream
at the HTTP transport (malformed bytes, non-finite logprobs and dropped streams
cannot be produced by a real server on demand). The openai SDK (3.x) sends
through ``httpx2``, which respx does not patch, so the mock is httpx2's own
``MockTransport`` given to the SDK as its ``http_client``."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest
from aiohttp.test_utils import TestClient
from fakes import FakeRemote, cand, script
from wire_streams import streaming

from adapters.base import ContextExhausted, RemoteBadResponse
from adapters.openai_chat import ChatAdapter
from adapters.openai_completions import CompletionsAdapter
from adapters.profiles import DEEPSEEK, LLAMA_CPP, PROFILES, VLLM, server_profile
from adapters.retry import RetryPolicy
from proxy.decoding.served import ServedModel
from proxy.server.app import create_app

UPSTREAM = "http://upstream.test/v1"
MSG = [{"role": "user", "content": "Say hi"}]


@pytest.fixture
async def served(aiohttp_client):
    """(openai client, aiohttp test client) for a served model backed by a scripted fake remote."""
    fake = FakeRemote(script(["Hi", " there", ",", " friend", "!", " How", " are", " you", "?"]))
    client: TestClient = await aiohttp_client(create_app({"m": ServedModel("m", fake)}))
    oa = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="none", max_retries=0)
    yield oa, client
    await oa.close()


# ----------------------------------------------------------------------------- 001
async def test_001_logprobs_without_top_logprobs(served):
    oa, client = served
    r = await oa.chat.completions.create(model="m", messages=MSG, logprobs=True, max_tokens=5)
    entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert e.top_logprobs == [] and isinstance(e.bytes, list) and all(isinstance(b, int) for b in e.bytes)
    raw = await (
        await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": MSG, "logprobs": True, "max_tokens": 5, "stream": True},
        )
    ).text()
    for line in raw.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                for e in (c.get("logprobs") or {}).get("content") or []:
                    assert e["top_logprobs"] == []


# ----------------------------------------------------------------------------- 002
@pytest.mark.parametrize("max_tokens,finish", [(4, "length"), (50, "stop")])
async def test_002_stream_logprobs_finish(served, max_tokens, finish):
    oa, _ = served
    kw = dict(model="m", messages=MSG, logprobs=True, top_logprobs=3, max_tokens=max_tokens, seed=3)
    whole = await oa.chat.completions.create(**kw)
    chunks = [c async for c in await oa.chat.completions.create(stream=True, **kw)]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish] == [whole.choices[0].finish_reason]
    streamed = []
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            assert c.choices[0].logprobs is not None
            assert "".join(e.token for e in c.choices[0].logprobs.content) == c.choices[0].delta.content
        if c.choices and c.choices[0].logprobs:
            streamed.extend(c.choices[0].logprobs.content)
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in whole.choices[0].logprobs.content
    ]
    assert "".join(e.token for e in streamed) == whole.choices[0].message.content


async def test_002_stream_ends_with_done(served):
    _, client = served
    raw = await (
        await client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True, "max_tokens": 3})
    ).text()
    events = [line for line in raw.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"


# ----------------------------------------------------------------------------- 003
async def test_003_usage_chunk_only_when_asked(served):
    oa, _ = served
    plain = [c async for c in await oa.chat.completions.create(model="m", messages=MSG, stream=True, max_tokens=4)]
    assert all(c.choices for c in plain) and all(c.usage is None for c in plain)
    with_usage = [
        c
        async for c in await oa.chat.completions.create(
            model="m", messages=MSG, stream=True, max_tokens=4, stream_options={"include_usage": True}
        )
    ]
    empty = [c for c in with_usage if not c.choices]
    assert len(empty) == 1 and with_usage[-1] is empty[0]
    u = empty[0].usage
    assert u.completion_tokens == 4 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert all(c.usage is None for c in with_usage[:-1])


# ----------------------------------------------------------------------------- 006
BAD_BODIES = [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
]


@pytest.mark.parametrize("extra,param", BAD_BODIES)
async def test_006_out_of_range_gets_400_and_server_keeps_serving(served, extra, param):
    _, client = served
    body = {"model": "m", "messages": MSG, **extra}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    ok = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "max_tokens": 2})
    assert ok.status == 200


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"model": NaN}', b"\xff\xfe"])
async def test_006_bodies_that_are_not_json_objects(served, raw):
    _, client = served
    resp = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and err["param"] is None


async def test_unknown_model_route_and_method(served):
    _, client = served
    r = await client.post("/v1/chat/completions", json={"model": "nope", "messages": MSG})
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
    r = await client.get("/v1/nothing")
    assert r.status == 404 and "error" in await r.json()
    r = await client.get("/v1/chat/completions")
    assert r.status == 405 and "error" in await r.json()
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["m"]


# ----------------------------------------------------------------------------- upstream mocks
def chat_step(
    entries: list[tuple[str, float, list[int] | None]],
    token: tuple[str, float, list[int] | None] | None = None,
    finish="length",
) -> dict:
    """One upstream chat response with one position."""
    tok = token or entries[0]
    tops = [{"token": t, "logprob": lp, "bytes": b} for t, lp, b in entries]
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "up",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": tok[0]},
                "finish_reason": finish,
                "logprobs": {"content": [{"token": tok[0], "logprob": tok[1], "bytes": tok[2], "top_logprobs": tops}]},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


def mock_client(handler) -> openai.DefaultAsyncHttpxClient:
    """An SDK http client whose transport calls ``handler(request) -> Response`` (may raise)."""
    return openai.DefaultAsyncHttpxClient(transport=httpx.MockTransport(streaming(handler)))


FAST_RETRY = RetryPolicy(attempts=3, total_seconds=5, initial_backoff=0.01, max_backoff=0.05)


def served_upstream(aiohttp_client, handler, profile=VLLM, retry=FAST_RETRY):
    adapter = ChatAdapter(
        profile=profile,
        name="up",
        base_url=UPSTREAM,
        model="up",
        api_key="sk-secret-upstream",
        retry=retry,
        http_client=mock_client(handler),
    )
    return aiohttp_client(create_app({"up": ServedModel("up", adapter)}))


FFFD = [239, 191, 189]


# ----------------------------------------------------------------------------- 004
async def test_004_replacement_char_bytes_from_upstream(aiohttp_client, caplog):
    steps = iter(
        [
            chat_step([("Caf", -0.1, list(b"Caf")), ("\ufffd", -0.5, FFFD)]),
            # The two halves of "é", both reported as U+FFFD's bytes, next to a whole token.
            chat_step([("\ufffd", -0.2, FFFD), ("e", -1.0, list(b"e")), ("\ufffd", -2.5, FFFD)]),
            chat_step([("\ufffd", -0.3, FFFD), (" au lait", -0.7, list(b" au lait"))]),
            chat_step([("<|im_end|>", -0.01, None)], finish="stop"),
        ]
    )

    def handler(req):
        return httpx.Response(200, json=next(steps))

    client = await served_upstream(aiohttp_client, handler)
    resp = await client.post(
        "/v1/chat/completions", json={"model": "up", "messages": MSG, "temperature": 0, "logprobs": True}
    )
    assert resp.status == 200
    body = await resp.json()
    text = body["choices"][0]["message"]["content"]
    assert text == "Cafe au lait" and "\ufffd" not in text
    assert all(b != FFFD for e in body["choices"][0]["logprobs"]["content"] for b in [e["bytes"]])
    assert "unknown bytes" in caplog.text


# ----------------------------------------------------------------------------- 005
def raw_step_handler(tops: list[tuple[str, str]]):
    """An upstream answering one position whose logprobs are written as raw JSON
    text (``-Infinity`` and ``NaN`` are not expressible through ``json=``)."""
    entries = ",".join(f'{{"token":"{t}","logprob":{lp},"bytes":[{ord(t)}]}}' for t, lp in tops)
    token, lp = tops[0]
    raw = (
        '{"id":"x","object":"chat.completion","created":0,"model":"up","choices":[{"index":0,'
        f'"message":{{"role":"assistant","content":"{token}"}},"finish_reason":"length","logprobs":{{"content":[{{"token":"{token}",'
        f'"logprob":{lp},"bytes":[{ord(token)}],"top_logprobs":[{entries}]}}]}}}}]}}'
    )
    return lambda req: httpx.Response(200, text=raw, headers={"content-type": "application/json"})


async def test_005_non_finite_logprobs(aiohttp_client):
    handler = raw_step_handler([("A", "-9999.0"), ("B", "-Infinity"), ("C", "-1.5")])
    client = await served_upstream(aiohttp_client, handler)
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "up", "messages": MSG, "max_tokens": 3, "logprobs": True, "top_logprobs": 3},
    )
    assert resp.status == 200
    text = await resp.text()
    assert "Infinity" not in text and "NaN" not in text
    body = json.loads(text)
    assert body["choices"][0]["message"]["content"] == "CCC"  # only C had probability


async def test_005_all_non_finite_is_a_clear_502(aiohttp_client):
    handler = raw_step_handler([("A", "-Infinity"), ("B", "NaN")])
    client = await served_upstream(aiohttp_client, handler)
    resp = await client.post("/v1/chat/completions", json={"model": "up", "messages": MSG})
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert "logprobs were unusable" in err["message"] and err["type"] == "upstream_error"


# ----------------------------------------------------------------------------- 007
async def test_007_mid_stream_upstream_failure(aiohttp_client):
    calls = {"n": 0}

    def upstream(request):
        calls["n"] += 1
        if calls["n"] <= 3:
            return httpx.Response(
                200,
                json=chat_step([(w, -0.1, list(w.encode())) for w in ["Hi", " yo"]][:1] + [(" x", -2.0, list(b" x"))]),
            )
        if calls["n"] == 4:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
        return httpx.Response(500, json={"error": {"message": "boom", "type": "server_error"}})

    handler = upstream
    client = await served_upstream(aiohttp_client, handler)
    oa = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="none", max_retries=0)
    got = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in await oa.chat.completions.create(
            model="up", messages=MSG, stream=True, max_tokens=20, temperature=0
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert "".join(got) == "HiHiHi"
    assert calls["n"] == 3 + 3  # the failed call was retried, bounded (3 attempts)
    assert "sk-secret-upstream" not in str(info.value)
    raw = await (
        await client.post(
            "/v1/chat/completions", json={"model": "up", "messages": MSG, "stream": True, "max_tokens": 5}
        )
    ).text()
    assert "[DONE]" not in raw and '"error"' in raw
    await oa.close()


async def test_retry_after_is_honoured_then_success(aiohttp_client):
    seen = []

    def upstream(request):
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.3"}, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json=chat_step([("<|im_end|>", -0.01, None)], finish="stop"))

    handler = upstream
    client = await served_upstream(aiohttp_client, handler)
    import time

    t0 = time.monotonic()
    resp = await client.post("/v1/chat/completions", json={"model": "up", "messages": MSG})
    assert resp.status == 200 and len(seen) == 2
    assert time.monotonic() - t0 >= 0.3


@pytest.mark.parametrize("status,expected", [(503, 503), (500, 502), (429, 503), (401, 502), (400, 400)])
async def test_upstream_errors_map_to_statuses(aiohttp_client, status, expected):
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(status, json={"error": {"message": "nope"}})

    client = await served_upstream(aiohttp_client, handler)
    resp = await client.post("/v1/chat/completions", json={"model": "up", "messages": MSG})
    assert resp.status == expected
    body = await resp.json()
    assert "sk-secret-upstream" not in json.dumps(body)
    retryable = status in (429, 500, 503)
    assert len(calls) == (3 if retryable else 1)


async def test_an_upstream_that_echoes_our_key_does_not_leak_it(aiohttp_client, caplog):
    def handler(request):
        key = request.headers["Authorization"].split()[1]
        return httpx.Response(401, json={"error": {"message": f"Incorrect API key provided: {key}"}})

    client = await served_upstream(aiohttp_client, handler)
    resp = await client.post("/v1/chat/completions", json={"model": "up", "messages": MSG})
    body = await resp.json()
    assert resp.status == 502 and "Incorrect API key provided: [upstream API key]" in body["error"]["message"]
    assert "sk-secret-upstream" not in json.dumps(body) and "sk-secret-upstream" not in caplog.text


def test_a_profile_for_every_prefill_setting():
    from proxy.common.literals import Prefill, values

    assert tuple(PROFILES) == values(Prefill)
    with pytest.raises(ValueError, match="valid: llama.cpp, vllm, deepseek, none"):
        server_profile("sglang")


async def test_profiles_send_the_right_prefill():
    bodies = []

    def handler(r):
        bodies.append(json.loads(r.content))
        if r.url.path.endswith("/chat/completions"):
            return httpx.Response(200, json=chat_step([("x", -0.1, [120])]))
        return httpx.Response(
            200,
            json={
                "id": "x",
                "object": "text_completion",
                "created": 0,
                "model": "up",
                "choices": [
                    {
                        "index": 0,
                        "text": "x",
                        "finish_reason": "length",
                        "logprobs": {
                            "tokens": ["x"],
                            "token_logprobs": [-0.1],
                            "top_logprobs": [{"x": -0.1, "y": -2.0}],
                            "text_offset": [0],
                        },
                    }
                ],
            },
        )

    from adapters.base import Context
    from adapters.templates import CHATML, ChatTemplate

    ctx = Context(messages=tuple(MSG), assistant_prefix="Hé".encode())
    for profile in (LLAMA_CPP, VLLM, DEEPSEEK):
        await ChatAdapter(
            profile=profile, name="up", base_url=UPSTREAM, model="up", api_key=None, http_client=mock_client(handler)
        ).draft(ctx, n_tokens=1, top_k=5)
    await CompletionsAdapter(
        template=ChatTemplate(CHATML),
        name="up",
        base_url=UPSTREAM,
        model="up",
        api_key=None,
        http_client=mock_client(handler),
    ).draft(ctx, n_tokens=1, top_k=5)
    llama, vllm, deepseek, completions = bodies
    assert llama["messages"][-1] == {"role": "assistant", "content": "Hé"} and "continue_final_message" not in llama
    assert (
        vllm["messages"][-1]["content"] == "Hé"
        and vllm["continue_final_message"] is True
        and vllm["add_generation_prompt"] is False
    )
    assert deepseek["messages"][-1] == {"role": "assistant", "content": "Hé", "prefix": True}
    assert completions["prompt"] == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nHé"
    assert all(b["top_logprobs" if "messages" in b else "logprobs"] == 5 for b in bodies)


# ----------------------------------------------------------------------------- bad input found by trying it
@pytest.mark.parametrize(
    "extra,param",
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": "42"}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"max_tokens": 10**9}, "max_tokens"),
    ],
)
async def test_wrong_types_are_refused_not_coerced(served, extra, param):
    _, client = served
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, **extra})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800 hi"}]}',  # a lone surrogate
        b"[" * 100_000 + b"]" * 100_000,  # nesting beyond the parser's recursion limit
    ],
)
async def test_unparseable_bodies_are_400_not_500(served, raw):
    _, client = served
    resp = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_bad_content_encoding_is_400(served):
    _, client = served
    resp = await client.post(
        "/v1/chat/completions",
        data=b"not gzip at all",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert resp.status == 400 and resp.headers.get("Connection", "").lower() == "close"
    # The unreadable body's connection is closed, not reused: the client's next request works.
    again = await client.get("/v1/models")
    assert again.status == 200


async def test_null_means_the_default_where_openai_allows_it(served):
    oa, client = served
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "logprobs": None}
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m", "messages": MSG, "max_tokens": 3, "seed": 1, **nulls}
    )
    body = await resp.json()
    assert resp.status == 200 and len(body["choices"]) == 1 and body["choices"][0]["logprobs"] is None
    resp = await client.post(
        "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3, "temperature": None, "echo": None}
    )
    assert resp.status == 200


@pytest.mark.parametrize(
    "extra,param,message",
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
            "messages[0].content[0].type: Input should be 'text'",
        ),
        ({"stop": 5}, "stop", "stop: Input should be a valid string or a valid list"),
        ({"messages": [{"role": "user", "content": "x"}, {"content": "y"}]}, "messages", "'messages[1].role'"),
        ({"max_tokens": 2, "max_completion_tokens": 8}, "max_completion_tokens", "give it alone"),
    ],
)
async def test_error_messages_name_the_place(served, extra, param, message):
    _, client = served
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, **extra})
    err = (await resp.json())["error"]
    assert resp.status == 400 and err["param"] == param and message in err["message"], err
    assert ".str" not in err["message"] and "list[" not in err["message"]


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2, 3]]])
async def test_token_id_prompts_get_a_clear_error(served, prompt):
    """OpenAI's completions take token ids too; the proxy has two tokenizers, so it says
    it takes text instead of pydantic's "Input should be a valid string"."""
    oa, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        await oa.completions.create(model="m", prompt=prompt, max_tokens=3)
    assert err.value.param == "prompt" and "token-id prompts are not supported" in err.value.message
    assert "valid string" not in err.value.message


async def test_negative_seed_is_a_seed(served):
    _, client = served
    body = {"model": "m", "messages": MSG, "seed": -1, "max_tokens": 3}
    first = await (await client.post("/v1/chat/completions", json=body)).json()
    again = await (await client.post("/v1/chat/completions", json=body)).json()
    assert first["choices"][0]["message"] == again["choices"][0]["message"]


async def test_model_retrieve(served):
    oa, _ = served
    assert (await oa.models.retrieve("m")).id == "m"
    with pytest.raises(openai.NotFoundError):
        await oa.models.retrieve("nope")


async def test_stream_that_fails_at_once_is_an_error_status_not_a_200(aiohttp_client):
    def failing(prefix):
        raise RemoteBadResponse("upstream sent garbage")

    client = await aiohttp_client(create_app({"m": ServedModel("m", FakeRemote(failing))}))
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
    assert resp.status == 502 and (await resp.json())["error"]["code"] == "bad_upstream_response"


async def test_full_context_ends_the_answer_with_length(aiohttp_client):
    words = script(["One", " two", " three", " four"])

    def steps(prefix):
        if len(prefix) >= len("One two"):
            raise ContextExhausted("4096 tokens exceed the context of 4096")
        return words(prefix)

    client = await aiohttp_client(create_app({"m": ServedModel("m", FakeRemote(steps))}))
    body = await (
        await client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "temperature": 0})
    ).json()
    assert body["choices"][0]["message"]["content"] == "One two" and body["choices"][0]["finish_reason"] == "length"

    def too_long(prefix):
        raise ContextExhausted("the prompt alone exceeds the context")

    client = await aiohttp_client(create_app({"m": ServedModel("m", FakeRemote(too_long))}))
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "context_length_exceeded"


async def test_client_disconnect_cancels_a_non_streamed_request(aiohttp_client, caplog):
    import asyncio

    import aiohttp

    fake = FakeRemote(lambda prefix: (cand(" x", -0.1), cand(" y", -1.0)))
    slow_draft = fake.draft

    async def draft(ctx, **kw):
        await asyncio.sleep(0.02)
        return await slow_draft(ctx, **kw)

    fake.draft = draft  # type: ignore[method-assign]
    caplog.set_level("INFO", logger="aiohttp.access")
    client = await aiohttp_client(
        create_app({"m": ServedModel("m", fake)}), server_kwargs={"handler_cancellation": True}
    )
    with pytest.raises(asyncio.TimeoutError):
        await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": MSG, "max_tokens": 2000},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    await asyncio.sleep(0.2)
    calls = fake.calls
    await asyncio.sleep(0.3)
    assert calls < 100 and fake.calls == calls  # the loop stopped with the client
    # aiohttp logs nothing for a cancelled handler: the access log still gets its line
    lines = [r for r in caplog.records if r.name == "aiohttp.access" and "POST /v1/chat/completions" in r.getMessage()]
    assert len(lines) == 1 and '" 499 ' in lines[0].getMessage() and "client closed" in lines[0].getMessage()
    assert lines[0].request_id.startswith("req_")


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None}, {"role": "assistant"}])
async def test_a_message_without_content_is_400(served, message):
    """OpenAI requires every message's content (an assistant's may be absent only with tool
    calls, which this server does not take): a missing or null content is a 400 naming it,
    not an empty message."""
    _, client = served
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "Hi"}, message], "max_tokens": 2},
    )
    err = (await resp.json())["error"]
    assert resp.status == 400 and err["param"] == "messages" and "messages[1].content" in err["message"]
