"""Provider profiles, one test per row of the docs' provider table: the request each hosted API
gets (endpoint, key, logprobs, seed field, how a partial answer is continued) and the strategy
``decoding = "auto"`` picks, through a mock transport with the wire shapes of OpenAI's API
reference and the openai SDK's types (hosted endpoints cannot run here); their error bodies
(a 400 for logprobs, for too many top_logprobs, for n) as clear errors; and the upstream key
never in an error, a log line or an error body."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from wire_streams import answer_as

from adapters.base import Context, RemoteRejected
from adapters.profiles import PROVIDERS
from proxy.config import ConfigError, ModelConfig
from proxy.decoding.types import ChoiceStats, SamplingParams
from proxy.registry import build_model
from proxy.server.app import create_app

ROOT = Path(__file__).resolve().parent.parent
MSG = ({"role": "user", "content": "Capital of France?"},)
SELF_HOSTED = "http://upstream.test/v1"
TOKENS = [" Paris", "."]


def _rest(done: str) -> list[str]:
    """The answer's tokens after the text already given (a continued partial answer)."""
    out, text = [], ""
    for t in TOKENS:
        if len(text) >= len(done):
            out.append(t)
        text += t
    return out


def chat_body(request: dict) -> dict:
    """A ``chat.completion`` as OpenAI's API reference shows it (logprobs where asked); a
    trailing assistant message is continued."""
    last = request["messages"][-1]
    text_tokens = _rest(last["content"] if last["role"] == "assistant" else "")
    k = int(request.get("top_logprobs") or 0)
    n = min(len(text_tokens), int(request.get("max_tokens") or len(text_tokens)))
    toks = text_tokens[:n]
    choice: dict = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(toks), "refusal": None},
        "finish_reason": "stop" if n == len(text_tokens) else "length",
        "logprobs": None,
    }
    if request.get("logprobs"):
        choice["logprobs"] = {
            "content": [
                {
                    "token": t,
                    "logprob": -0.1,
                    "bytes": list(t.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": -0.1, "bytes": list(t.encode())},
                        *({"token": f" x{j}", "logprob": -3.0 - j, "bytes": list(f" x{j}".encode())} for j in range(k - 1)),
                    ],
                }
                for t in toks
            ],
            "refusal": None,
        }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": request.get("model", "m"),
        "choices": [choice],
        "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n},
    }


def completion_body(request: dict) -> dict:
    """A ``text_completion`` (Together's and Fireworks' raw completions)."""
    text_tokens = _rest(request["prompt"].rsplit("<|im_start|>assistant\n", 1)[-1])
    k = int(request.get("logprobs") or 0)
    n = min(len(text_tokens), int(request.get("max_tokens") or len(text_tokens)))
    toks = text_tokens[:n]
    choice: dict = {"index": 0, "text": "".join(toks), "finish_reason": "stop" if n == len(text_tokens) else "length"}
    choice["logprobs"] = (
        {
            "tokens": toks,
            "token_logprobs": [-0.1] * n,
            "top_logprobs": [{t: -0.1, **{f" x{j}": -3.0 - j for j in range(k - 1)}} for t in toks],
            "text_offset": [sum(len(x) for x in toks[:i]) for i in range(n)],
        }
        if k
        else None
    )
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
        "usage": {"prompt_tokens": 9, "completion_tokens": n, "total_tokens": 9 + n},
    }


def responses_body(request: dict) -> dict:
    """A ``response`` as OpenAI's Responses API reference shows it (logprobs where included)."""
    n = min(len(TOKENS), int(request.get("max_output_tokens") or len(TOKENS)))
    toks = TOKENS[:n]
    part: dict = {"type": "output_text", "text": "".join(toks), "annotations": []}
    if "message.output_text.logprobs" in (request.get("include") or []):
        part["logprobs"] = [{"token": t, "bytes": list(t.encode()), "logprob": -0.1, "top_logprobs": []} for t in toks]
    status = "completed" if n == len(TOKENS) else "incomplete"
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": status,
        "incomplete_details": None if status == "completed" else {"reason": "max_output_tokens"},
        "model": request["model"],
        "output": [{"type": "message", "id": "msg_1", "status": status, "role": "assistant", "content": [part]}],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 9,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": n,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 9 + n,
        },
    }


class Upstream:
    """A mock transport that records each request and answers as the API does."""

    def __init__(self, reply=None) -> None:
        self.requests: list[httpx.Request] = []
        self.reply = reply

    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content)
        if self.reply is not None:
            return self.reply(request, body)
        if request.url.path.endswith("/chat/completions"):
            return answer_as(body, chat_body(body))
        if request.url.path.endswith("/responses"):
            return httpx.Response(200, json=responses_body(body))
        return answer_as(body, completion_body(body))

    def client(self) -> openai.DefaultAsyncHttpxClient:
        return openai.DefaultAsyncHttpxClient(transport=httpx.MockTransport(self.handler))


def _config(name: str, **extra) -> ModelConfig:
    p = PROVIDERS[name]
    keys = dict(provider=name, remote_model="m", **extra)
    if p.base_url is None:
        keys["base_url"] = SELF_HOSTED
    if p.backend == "openai-completions":
        keys["template"] = "chatml"
    return ModelConfig(**keys)


def expected_mode(name: str) -> str:
    profile = PROVIDERS[name].profile
    can_continue = PROVIDERS[name].backend == "openai-completions" or profile.prefill is not None
    if can_continue:
        return "token" if profile.logprobs else "guided"
    return "sequence"


async def _answer(model, **params) -> str:
    stats = ChoiceStats()
    pieces = [p async for p in model.generate(Context(messages=MSG), SamplingParams(**params), stats=stats)]
    return "".join(p.text for p in pieces)


@pytest.mark.parametrize("name", list(PROVIDERS))
async def test_each_provider_row_gets_its_own_requests(name, monkeypatch):
    p = PROVIDERS[name]
    if p.api_key_env:
        monkeypatch.setenv(p.api_key_env, f"key-of-{name}")
    upstream = Upstream()
    model = build_model("m", _config(name), http_client=upstream.client())
    assert model.mode == expected_mode(name)
    assert model.top_k == (min(20, p.profile.max_top_logprobs) if p.profile.logprobs else 20)
    assert await _answer(model, max_tokens=8, temperature=0.0) == " Paris."
    first = upstream.requests[0]
    endpoint = {"openai-completions": "/completions", "openai-responses": "/responses"}.get(p.backend, "/chat/completions")
    assert str(first.url) == (p.base_url or SELF_HOSTED) + endpoint
    assert first.headers["authorization"] == (f"Bearer key-of-{name}" if p.api_key_env else "Bearer none")
    for body in upstream.bodies():
        assert body["model"] == "m"
        if p.backend == "openai-responses":
            assert body["store"] is False and "seed" not in body and "stop" not in body
            continue
        if model.mode == "token":
            k = body.get("top_logprobs", body.get("logprobs"))
            assert k is not None and int(k) <= p.profile.max_top_logprobs
        else:
            assert "logprobs" not in body and "top_logprobs" not in body  # never asked of an API that 400s
        assert "n" not in body or body["n"] == 1
        assert not {"top_k", "min_p", "repeat_penalty", "repetition_penalty"} & set(body) or name in ("llama.cpp", "vllm")

    # the seed goes in the provider's own field, or nowhere
    upstream.requests.clear()
    await model.adapter.sample(Context(messages=MSG), max_tokens=4, temperature=1.0, top_p=1.0, seed=7)
    body = upstream.bodies()[0]
    field = p.profile.seed_field
    assert {k for k in ("seed", "random_seed") if k in body} == ({field} if field else set())
    if field:
        assert body[field] == 7

    # continuing a partial answer, the provider's way (or refused where it cannot)
    upstream.requests.clear()
    partial = Context(messages=MSG, assistant_prefix=b"The capital is")
    if p.backend == "openai-responses":
        with pytest.raises(RemoteRejected, match="cannot continue"):
            await model.adapter.sample(partial, max_tokens=4, temperature=0.0, top_p=1.0)
    elif p.backend == "openai-completions":
        await model.adapter.sample(partial, max_tokens=4, temperature=0.0, top_p=1.0)
        assert upstream.bodies()[0]["prompt"].endswith("<|im_start|>assistant\nThe capital is")
    elif p.profile.prefill is None:
        with pytest.raises(RemoteRejected, match="cannot continue"):
            await model.adapter.sample(partial, max_tokens=4, temperature=0.0, top_p=1.0)
        assert not upstream.requests
    else:
        await model.adapter.sample(partial, max_tokens=4, temperature=0.0, top_p=1.0)
        body = upstream.bodies()[0]
        assert body["messages"][-1] == {"role": "assistant", "content": "The capital is", **p.profile.prefill.message}
        for key, value in p.profile.prefill.body.items():
            assert body[key] == value
    await model.aclose()


def test_capabilities_are_overridden_per_model(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("GROQ_API_KEY", "k")
    assert build_model("m", _config("openai")).mode == "sequence"
    assert build_model("m", _config("openai", prefill="llama.cpp")).mode == "token"
    assert build_model("m", _config("groq")).mode == "guided"
    assert build_model("m", _config("groq", logprobs=True, max_top_logprobs=5)).mode == "token"
    assert build_model("m", _config("groq", logprobs=True, max_top_logprobs=5)).top_k == 5
    assert build_model("m", _config("groq", prefill="none")).mode == "sequence"
    assert build_model("m", _config("groq", decoding="sequence")).mode == "sequence"
    with pytest.raises(ConfigError, match="no logprobs, which token mode needs"):
        build_model("m", _config("groq", decoding="token"))


def test_config_errors_name_the_key_and_the_valid_values(monkeypatch):
    with pytest.raises(ValueError, match=r"provider: unknown provider 'opneai'; valid: openai, openai-responses, azure, .*tgi"):
        ModelConfig(provider="opneai", remote_model="m")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="reads its API key from OPENAI_API_KEY, which is not set"):
        ModelConfig(provider="openai", remote_model="m")
    with pytest.raises(ValueError, match="base_url is required for provider 'vllm'"):
        ModelConfig(provider="vllm", remote_model="m")
    with pytest.raises(ValueError, match="backend or provider is required"):
        ModelConfig(remote_model="m")
    with pytest.raises(ValueError, match="provider 'vllm' is reached through 'openai-chat', not 'openai-completions'"):
        ModelConfig(provider="vllm", backend="openai-completions", base_url=SELF_HOSTED)
    with pytest.raises(ValueError, match="base_url: 'not a url' is not an http"):
        ModelConfig(provider="vllm", base_url="not a url")
    with pytest.raises(ValueError, match="max_top_logprobs"):
        ModelConfig(provider="vllm", base_url=SELF_HOSTED, max_top_logprobs=21)


def _openai_error(status: int, message: str, param: str | None, code: str):
    def reply(request, body):
        return httpx.Response(
            status, json={"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
        )

    return reply


@pytest.mark.parametrize(
    ("name", "extra", "status", "message", "param", "code"),
    [
        # gpt-5 and the o-series on chat: no logprobs at all (a model listed as giving them)
        ("openai", {"logprobs": True, "prefill": "llama.cpp"}, 400, "logprobs are not supported with reasoning models", "logprobs", "unsupported_parameter"),
        # gpt-5.4: top_logprobs above 5
        ("openai", {"logprobs": True, "prefill": "llama.cpp"}, 400, "top_logprobs must be less than or equal to 5", "top_logprobs", "invalid_value"),
        # Groq: n above 1
        ("groq", {}, 400, "'n' : number must be at most 1", "n", "invalid_value"),
    ],
)
async def test_hosted_refusals_reach_the_client_as_clear_errors(aiohttp_client, monkeypatch, name, extra, status, message, param, code):
    monkeypatch.setenv(PROVIDERS[name].api_key_env, "k")
    upstream = Upstream(_openai_error(status, message, param, code))
    model = build_model("m", _config(name, **extra), http_client=upstream.client())
    client = await aiohttp_client(create_app({"m": model}))
    r = await client.post("/v1/chat/completions", json={"model": "m", "messages": list(MSG), "max_tokens": 4})
    assert 400 <= r.status < 600 and r.status != 500
    err = (await r.json())["error"]
    assert message in err["message"] and "Traceback" not in err["message"]
    assert len(upstream.requests) == 1  # a 400 is not retried


@pytest.mark.parametrize("backend", ["openai-chat", "openai-completions", "openai-responses"])
async def test_the_upstream_key_is_never_in_an_error_a_log_line_or_a_body(aiohttp_client, monkeypatch, caplog, backend):
    key = "sk-proj-THISISTHEKEY0123456789"
    monkeypatch.setenv("UPSTREAM_KEY", key)

    def reply(request, body):
        assert request.headers["authorization"] == f"Bearer {key}"
        return httpx.Response(
            401,
            json={
                "error": {
                    "message": f"Incorrect API key provided: {key}. You can find your API key at ...",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        )

    upstream = Upstream(reply)
    cfg = ModelConfig(
        backend=backend, base_url=SELF_HOSTED, remote_model="m", api_key_env="UPSTREAM_KEY", template="chatml", prefill="none"
    )
    model = build_model("m", cfg, http_client=upstream.client())
    client = await aiohttp_client(create_app({"m": model}))
    caplog.set_level(logging.DEBUG)
    path, req = (
        ("/v1/completions", {"prompt": "Hi"}) if backend == "openai-completions" else ("/v1/chat/completions", {"messages": list(MSG)})
    )
    r = await client.post(path, json={"model": "m", "max_tokens": 4, **req})
    text = await r.text()
    assert r.status >= 400 and key not in text
    assert "Incorrect API key" in text
    metrics = await (await client.get("/metrics")).text()
    assert key not in caplog.text and key not in metrics
    assert not re.search(r"sk-proj-\w{6,}", caplog.text + text + metrics)


def test_the_docs_table_lists_every_provider_as_the_code_has_it():
    """docs/providers.md's table, row by row, against :data:`adapters.profiles.PROVIDERS`."""
    rows = {}
    for line in (ROOT / "docs" / "providers.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(PROVIDERS)
    for name, cells in rows.items():
        p = PROVIDERS[name]
        assert cells[1] == f"`{p.backend}`", name
        top = f"≤ {p.profile.max_top_logprobs}" if p.profile.logprobs else "no"
        assert cells[2] == top, (name, cells[2])
        assert cells[4] == expected_mode(name), (name, cells[4])
        assert cells[5] == ("yes" if p.n else "no"), name
        assert cells[6] == (f"`{p.profile.seed_field}`" if p.profile.seed_field else "no"), name


async def test_the_start_up_probe_catches_a_model_that_refuses_logprobs(monkeypatch):
    """``probe = true``: one call asking for what the strategy needs; a 400 for logprobs (a
    model that the provider's table says gives them, but does not) stops the start with the
    upstream's message and the keys to change; a model that accepts passes."""
    from proxy.cli.serve import probe_models
    from proxy.config import Config

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    refusing = Upstream(
        lambda request, body: httpx.Response(
            400,
            json={"error": {"message": "logprobs are not supported with reasoning models", "type": "invalid_request_error", "param": "logprobs", "code": "unsupported_parameter"}},
        )
        if body.get("logprobs")
        else httpx.Response(200, json=chat_body(body))
    )
    cfg = _config("openai", probe=True)
    config = Config(models={"gpt5": cfg, "ok": _config("openai", probe=True, logprobs=False)})
    models = {
        "gpt5": build_model("gpt5", cfg, http_client=refusing.client()),
        "ok": build_model("ok", config.models["ok"], http_client=refusing.client()),
    }
    failed = await probe_models(config, models)
    assert len(failed) == 1 and failed[0].startswith("models.gpt5: the upstream refused the start-up probe (sequence mode)")
    assert "logprobs are not supported" in failed[0] and "logprobs = false" in failed[0]
    assert len(refusing.requests) == 2 and refusing.bodies()[0]["max_tokens"] == 1


async def test_responses_upstream_cuts_an_answer_below_its_minimum_and_takes_messages_only(monkeypatch):
    """OpenAI's Responses API answers at least 16 tokens: a smaller limit is cut by the proxy at
    the remote's own tokens (its output text's logprobs), and reported as "length"."""
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    upstream = Upstream()
    model = build_model("m", _config("openai-responses"), http_client=upstream.client())
    s = await model.adapter.sample(Context(messages=MSG), max_tokens=1, temperature=0.0, top_p=1.0)
    assert (s.text, s.finish_reason, s.completion_tokens) == (" Paris", "length", 1)
    body = upstream.bodies()[0]
    assert body["max_output_tokens"] == 16 and body["include"] == ["message.output_text.logprobs"]
    whole = await model.adapter.sample(Context(messages=MSG), max_tokens=40, temperature=0.0, top_p=1.0)
    assert (whole.text, whole.finish_reason) == (" Paris.", "stop") and "include" not in upstream.bodies()[1]
    with pytest.raises(RemoteRejected, match="takes messages only"):
        await model.adapter.sample(Context(prompt="Hi"), max_tokens=4, temperature=0.0, top_p=1.0)
    no_logprobs = build_model("m", _config("openai-responses", logprobs=False), http_client=upstream.client())
    with pytest.raises(RemoteRejected, match="cannot cut the answer"):
        await no_logprobs.adapter.sample(Context(messages=MSG), max_tokens=4, temperature=0.0, top_p=1.0)
