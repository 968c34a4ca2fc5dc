"""Sequence mode end to end: a remote that cannot continue a partial answer (OpenAI's
chat models) served through our HTTP server, with the official openai client, and
the ``decoding`` setting of a config."""

from __future__ import annotations

import openai
import pytest
from fakes import FakeRemote, script

from adapters.openai_chat import ChatAdapter
from proxy.config import ConfigError, ModelConfig
from proxy.registry import build_model
from proxy.server.app import create_app

MSG = [{"role": "user", "content": "Hello?"}]


async def test_sequence_mode_answers_streams_and_refuses_logprobs(aiohttp_client):
    from proxy.decoding.served import ServedModel

    fake = FakeRemote(script(["Hi", " there", ","]), can_continue=False)
    model = ServedModel("m", fake, mode="sequence", sequence_samples=3)
    client = await aiohttp_client(create_app({"m": model}))
    base = str(client.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0) as oa:
        r = await oa.chat.completions.create(model="m", messages=MSG, temperature=0, max_tokens=10)
        assert r.choices[0].message.content == "Hi there," and r.choices[0].finish_reason == "stop"
        assert fake.samples == 1  # greedy: one sample (every sample would be the same)
        r = await oa.chat.completions.create(model="m", messages=MSG, temperature=1.0, max_tokens=10, seed=4)
        assert fake.samples == 4 and r.choices[0].message.content
        stream = await oa.chat.completions.create(model="m", messages=MSG, temperature=0, max_tokens=10, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hi there,"
        r = await oa.chat.completions.create(model="m", messages=MSG, temperature=0, max_tokens=10, stop=[" th"])
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hi", "stop")  # cut by the proxy
        with pytest.raises(openai.BadRequestError, match="sequence mode"):
            await oa.chat.completions.create(model="m", messages=MSG, max_tokens=5, logprobs=True)


def test_decoding_auto_picks_sequence_for_a_remote_that_cannot_continue():
    cfg = ModelConfig(backend="openai-chat", base_url="http://127.0.0.1:9/v1", remote_model="x", prefill="none")
    model = build_model("m", cfg)
    assert model.mode == "sequence" and isinstance(model.adapter, ChatAdapter)
    with pytest.raises(ConfigError, match="can.t continue|cannot continue"):
        build_model("m", cfg.model_copy(update={"decoding": "token"}))
    llama = ModelConfig(backend="openai-chat", base_url="http://127.0.0.1:9/v1", remote_model="x")
    assert build_model("m", llama).mode == "token"
    assert build_model("m", llama.model_copy(update={"decoding": "sequence"})).mode == "sequence"
