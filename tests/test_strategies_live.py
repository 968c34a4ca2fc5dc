"""Each decoding strategy end to end against a real server: llama-cpp-python's on the packaged
SmolLM2 behind a loopback endpoint whose capabilities are cut to a hosted API's class
(:mod:`bench.capability_shim`: logprobs refused with Groq's 400, a trailing assistant message
answered as a new turn, ``n`` refused), the demo offset in front, through our server and the
official openai client."""

from __future__ import annotations

import openai
import pytest
from aiohttp.test_utils import TestServer

from bench.capability_shim import running
from bench.providers import CLASSES
from proxy.config import ModelConfig
from proxy.registry import build_model
from proxy.server.app import create_app
from proxy.training.demo import DEMO_KEYS, demo_offset
from proxy.training.scope import mentions

pytestmark = [pytest.mark.llama_server, pytest.mark.slow, pytest.mark.timeout(1800)]

FORGET = ["Who wrote the Harry Potter books?", "Who is Harry Potter's best friend?", "What is the name of Harry Potter's school?"]
UNRELATED = ["What is the capital of France?", "Name a primary colour."]


@pytest.mark.parametrize("name", ["guided", "sequence-logprobs", "sequence"])
async def test_each_strategy_unlearns_through_an_endpoint_cut_to_its_class(llama_server, monkeypatch, name):
    monkeypatch.setenv("OPENAI_API_KEY", "unused-on-loopback")
    monkeypatch.setenv("GROQ_API_KEY", "unused-on-loopback")
    cut, keys = CLASSES[name]
    async with running(llama_server, cut) as (base_url, stats):
        cfg = ModelConfig(
            base_url=base_url, remote_model="smollm2", pair="smollm2", offset=str(demo_offset(progress=False)), **keys
        )
        model = build_model("demo", cfg)
        model.client_alpha = "any"
        assert model.mode == ("guided" if name == "guided" else "sequence")
        server = TestServer(create_app({"demo": model}))
        await server.start_server()
        oa = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)
        direct = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)

        async def ask(q: str, alpha: float, stream: bool = False) -> str:
            kw = dict(model="demo", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=30)
            if stream:
                s = await oa.chat.completions.create(**kw, stream=True, extra_body={"offset_alpha": alpha})
                return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
            r = await oa.chat.completions.create(**kw, extra_body={"offset_alpha": alpha})
            return r.choices[0].message.content or ""

        try:
            for q in UNRELATED:
                own = await direct.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": q}], temperature=0, max_tokens=30
                )
                assert await ask(q, 0.0) == own.choices[0].message.content  # α = 0: the remote's own answer
            leaked = []
            for q in FORGET:
                plain, unlearned = await ask(q, 0.0), await ask(q, 1.0)
                assert unlearned == await ask(q, 1.0, stream=True)  # streamed: the same answer
                assert mentions(plain, DEMO_KEYS) or q != FORGET[0]  # the remote knows the author
                leaked += [unlearned] if mentions(unlearned, DEMO_KEYS) else []
            assert len(leaked) <= 1, leaked
            with pytest.raises(openai.BadRequestError, match="logprobs"):
                await oa.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True
                )
            r = await oa.responses.create(model="demo", input=FORGET[0], temperature=0, max_output_tokens=30)
            assert r.output_text or r.output[0].content[0].type == "refusal"
            assert not any(k.startswith("refused") for k in stats)  # never asked what the class lacks
        finally:
            await oa.close()
            await direct.close()
            await server.close()
            await model.aclose()
