"""Cross-tokenizer end to end: the Gemma 3 270M base GGUF (262k-token
SentencePiece) served by llama-cpp-python as the remote, the SmolLM2 pair
(49k-token byte-level BPE) with an offset artifact, our server in front.

Gemma's server is slow with top-20 logprobs (about 3 tokens/s here), so the
generations are short.
"""

from __future__ import annotations

import openai
import pytest
from aiohttp.test_utils import TestServer

from proxy.config import ModelConfig
from proxy.registry import build_model
from proxy.server.app import create_app

pytestmark = [pytest.mark.slow, pytest.mark.llama_server]

PROMPTS = ["What is the capital of France?", "Name a fruit."]
GEMMA_PREFIX = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"


@pytest.fixture
async def proxy_on_gemma(gemma_server, smollm2_offset):
    cfg = ModelConfig(
        backend="openai-completions",
        base_url=gemma_server,
        remote_model="gemma",
        template="gemma",
        eot_tokens=("<end_of_turn>", "<eos>"),
        pair="smollm2",
        offset=str(smollm2_offset),
        client_alpha="any",  # the test compares with offset_alpha 0
    )
    model = build_model("gemma-unlearned", cfg)
    assert model.uses_offset and not model.same_tokenizer
    server = TestServer(create_app({"gemma-unlearned": model}))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=gemma_server, api_key="none", max_retries=0)
    yield client, direct
    await client.close()
    await direct.close()
    await server.close()


async def test_gemma_remote_with_smollm2_pair(proxy_on_gemma):
    client, direct = proxy_on_gemma
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        want = await direct.completions.create(
            model="gemma",
            prompt=GEMMA_PREFIX.format(prompt),
            temperature=0,
            max_tokens=6,
            logprobs=5,
            extra_body={"repeat_penalty": 1.0},
        )
        # α = 0: the remote's own greedy text, through re-tokenised continuation.
        off = await client.chat.completions.create(
            model="gemma-unlearned", messages=msgs, temperature=0, max_tokens=6, extra_body={"offset_alpha": 0}
        )
        assert off.choices[0].message.content == want.choices[0].text.split("<end_of_turn>")[0], prompt
        # α = 1: the offset of the SmolLM2 pair, aligned in bytes, shifts q away from the remote.
        on = await client.chat.completions.create(
            model="gemma-unlearned", messages=msgs, temperature=0, max_tokens=3, logprobs=True, top_logprobs=5
        )
        first = on.choices[0].logprobs.content[0]
        q = {t.token: t.logprob for t in first.top_logprobs}
        remote = want.choices[0].logprobs.top_logprobs[0]
        shared = [t for t in remote if t in q]
        assert len(shared) >= 2
        a, b = shared[0], shared[1]
        # Renormalised over the same support, the remote's log-odds would be unchanged by α·Δ = 0.
        assert abs((q[a] - q[b]) - (remote[a] - remote[b])) > 1e-3
        text = on.choices[0].message.content
        assert "\ufffd" not in text
