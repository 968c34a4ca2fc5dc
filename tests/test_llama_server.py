"""End to end on real parts: llama-cpp-python's server on 127.0.0.1 as the
remote, our aiohttp server in front, the official openai client talking to it.

llama-cpp-python's server answers a trailing assistant message in a new turn
(it does not continue it) and sends ``bytes: null``, so it is served through
raw ``/v1/completions`` with the GGUF's own chat template rendered by the
proxy (``openai-completions`` backend, template ``gguf:smollm2``).
"""

from __future__ import annotations

import openai
import pytest
from aiohttp.test_utils import TestServer

from proxy.config import ModelConfig
from proxy.registry import build_model
from proxy.server.app import create_app

pytestmark = [pytest.mark.slow, pytest.mark.llama_server]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Name a famous physicist.",
    "Translate 'good morning' into Spanish.",
    "Give me one tip for sleeping better.",
    "What is photosynthesis?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
]
NO_PENALTY = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}  # the server's own defaults are not plain greedy


@pytest.fixture
async def proxy_on_llama(llama_server):
    cfg = ModelConfig(
        backend="openai-completions", base_url=llama_server, remote_model="smollm2", template="gguf:smollm2"
    )
    model = build_model("smollm2-remote", cfg)
    server = TestServer(create_app({"smollm2-remote": model}))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=llama_server, api_key="none", max_retries=0)
    yield client, direct
    await client.close()
    await direct.close()
    await server.close()


async def test_zero_offset_greedy_equals_direct_for_ten_prompts(proxy_on_llama):
    """Greedy through the proxy (no offset) equals the server's own greedy text.

    llama.cpp's logits depend on how a position was evaluated: a prompt in one
    batch goes through a matrix-matrix kernel, a single token through a vector
    kernel, and with quantised weights the two differ by a few hundredths of a
    nat, which flips near-ties. The server's prompt cache decides which one a
    request gets, so the fixture runs it with ``--n_batch 1``: every position is
    evaluated alone and the logits no longer depend on earlier requests.
    """
    client, direct = proxy_on_llama
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        want = await direct.chat.completions.create(
            model="smollm2", messages=msgs, temperature=0, max_tokens=24, extra_body=NO_PENALTY
        )
        got = await client.chat.completions.create(model="smollm2-remote", messages=msgs, temperature=0, max_tokens=24)
        assert got.choices[0].message.content == want.choices[0].message.content, prompt
        streamed = await client.chat.completions.create(
            model="smollm2-remote", messages=msgs, temperature=0, max_tokens=24, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
        assert text == want.choices[0].message.content, prompt


async def test_streamed_and_logprobs_through_the_sdk(proxy_on_llama):
    client, _ = proxy_on_llama
    msgs = [{"role": "user", "content": "Say hello."}]
    r = await client.chat.completions.create(
        model="smollm2-remote", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=3, seed=1
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in content)
    assert r.usage.prompt_tokens > 10
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="smollm2-remote",
            messages=msgs,
            max_tokens=8,
            logprobs=True,
            stream=True,
            seed=1,
            stream_options={"include_usage": True},
        )
    ]
    assert chunks[-1].usage is not None and not chunks[-1].choices
    text = await client.completions.create(
        model="smollm2-remote", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    assert text.choices[0].text and len(text.choices[0].logprobs.tokens) >= 1


@pytest.mark.parametrize("same_tokenizer", [True, False])
async def test_speculative_greedy_equals_token_by_token_with_an_offset(llama_server, smollm2_offset, same_tokenizer):
    """With a (random, non-zero) offset, greedy speculative decoding on the real server
    gives token-by-token decoding's text, on both alignment paths, in fewer calls."""
    from adapters.base import Context
    from proxy.decoding.types import ChoiceStats, SamplingParams

    cfg = ModelConfig(
        backend="openai-completions",
        base_url=llama_server,
        remote_model="smollm2",
        template="gguf:smollm2",
        pair="smollm2",
        offset=str(smollm2_offset),
        same_tokenizer=same_tokenizer,
    )
    pairs: dict = {}
    spec = build_model("spec", cfg, pairs=pairs)
    tbt = build_model("tbt", cfg.model_copy(update={"speculative": False}), pairs=pairs)
    changed = 0
    try:
        for prompt in PROMPTS[:1]:
            ctx = Context(messages=({"role": "user", "content": prompt},))
            texts, calls = [], []
            for model in (spec, tbt):
                stats = ChoiceStats()
                params = SamplingParams(max_tokens=16, temperature=0, alpha=8.0)  # a random offset is weak
                texts.append("".join([p.text async for p in model.generate(ctx, params, stats=stats)]))
                calls.append(stats.remote_calls)
                changed += stats.offset_changed if model is tbt else 0
            assert texts[0] == texts[1], prompt
            assert calls[0] < calls[1], (prompt, calls)
        assert changed > 0  # the offset did change tokens, so drafts were really rejected and resumed
    finally:
        await spec.aclose()
        await tbt.aclose()


@pytest.mark.parametrize("top_k_drafts", [True, False])
async def test_sampled_drafts_come_from_the_top_k_when_asked(llama_server, top_k_drafts):
    """At T = 1 llama.cpp draws drafts from its top-k alone when the adapter asks for
    ``top_k`` (the law the decoder assumes, :attr:`Capabilities.top_k_drafts`); with
    ``top_k`` off the drafts do come from the tail, so the check can fail."""
    import dataclasses

    from adapters.base import Context
    from adapters.openai_completions import CompletionsAdapter
    from adapters.profiles import LLAMA_CPP

    adapter = CompletionsAdapter(
        name="llama", base_url=llama_server, model="smollm2", api_key=None, template=None, profile=LLAMA_CPP
    )
    adapter.capabilities = dataclasses.replace(adapter.capabilities, top_k_drafts=top_k_drafts)
    outside = positions = 0
    try:
        for seed in range(4):
            draft = await adapter.draft(Context(prompt="Once upon a time, in a"), n_tokens=32, top_k=3, seed=seed)
            for pos in draft.positions:
                positions += 1
                outside += pos.sampled.token not in {c.token for c in pos.candidates}
    finally:
        await adapter.aclose()
    assert positions >= 64
    if top_k_drafts:
        assert outside == 0
    else:
        assert outside > 0


async def test_streamed_drafts_give_whole_drafts_answers_and_usage(llama_server, smollm2_offset):
    """The same requests with drafts streamed (closed at the first replaced token) and whole:
    the same text, greedy and at T = 1 with a seed, and the same usage (llama-cpp-python's
    streams report none: the prompt is counted by its tokenize endpoint)."""
    import dataclasses

    from adapters.base import Context
    from proxy.decoding.types import ChoiceStats, SamplingParams

    cfg = ModelConfig(
        backend="openai-completions",
        base_url=llama_server,
        remote_model="smollm2",
        template="gguf:smollm2",
        pair="smollm2",
        offset=str(smollm2_offset),
    )
    pairs: dict = {}
    streamed = build_model("streamed", cfg, pairs=pairs)
    whole = build_model("whole", cfg, pairs=pairs)
    whole.adapter.capabilities = dataclasses.replace(whole.adapter.capabilities, streams_drafts=False)
    assert streamed.adapter.capabilities.streams_drafts
    try:
        for prompt, temperature in ((PROMPTS[1], 0.0), (PROMPTS[4], 1.0)):
            ctx = Context(messages=({"role": "user", "content": prompt},))
            out = []
            for model in (streamed, whole):
                stats = ChoiceStats()
                params = SamplingParams(max_tokens=24, temperature=temperature, alpha=8.0, seed=3)
                text = "".join([p.text async for p in model.generate(ctx, params, stats=stats)])
                out.append((text, stats.prompt_tokens, stats.completion_tokens))
            assert out[0] == out[1], prompt
            assert out[0][1] and out[0][1] > 5
    finally:
        await streamed.aclose()
        await whole.aclose()
