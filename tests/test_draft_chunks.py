"""How many positions of a draft computed as read the pair scores a pass
(proxy.decoding.speculative.on_demand_chunk): short chunks where the scope gate is open, a
doubling run where it is closed, and the same answers whatever the chunks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import make_tiny_pair
from fakes import FakeRemote, script

from adapters.base import Context
from proxy.decoding.alignment import Aligner
from proxy.decoding.scope_gate import ScopeGate
from proxy.decoding.served import ServedModel
from proxy.decoding.speculative import GATED_FIRST_CHUNK, IN_SCOPE_CHUNK, ON_DEMAND_FIRST_CHUNK, on_demand_chunk
from proxy.decoding.types import SamplingParams

ALPHA = 0.5  # the offset replaces some drafted tokens, not all: runs of accepted chunks
WORDS = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."] * 4


def test_chunk_rules():
    """Open gate: the in-scope chunk, after any chunk. Not read yet: the gated first chunk.
    Closed gate or none: a quarter of the expected run at first (at least the minimum), then doubling."""
    for previous in (None, 4, 16, 64):
        assert on_demand_chunk(previous, True, gated=True, expected_run=128) == IN_SCOPE_CHUNK
    assert on_demand_chunk(None, None, gated=True, expected_run=128) == GATED_FIRST_CHUNK
    assert on_demand_chunk(None, False, gated=True, expected_run=128) == 32
    assert on_demand_chunk(None, None, gated=False, expected_run=128) == 32
    assert on_demand_chunk(None, None, gated=False, expected_run=8) == ON_DEMAND_FIRST_CHUNK
    assert on_demand_chunk(IN_SCOPE_CHUNK, False, gated=True, expected_run=128) == 2 * IN_SCOPE_CHUNK
    assert on_demand_chunk(16, None, gated=False, expected_run=4) == 32


@pytest.mark.parametrize("bias", [50.0, -50.0], ids=["gate open", "gate closed"])
def test_chunks_follow_the_gate_and_answers_do_not(tiny_base, smollm2_tokenizer, monkeypatch, bias):
    """Through the decoder with a remote that computes drafts as read: where the gate is open
    every pass after the first scores at most the in-scope chunk, where it is closed the
    chunks double from the gated first chunk; greedy answers are those of whole drafts (a
    seeded one at T = 1 is the same twice: draft lengths decide where its random draws go),
    and the offset changed tokens where the gate was open."""
    chunks: list[int] = []
    real = Aligner.draft_deltas

    def recorded(self, chain, candidates):
        chunks.append(len(candidates))
        return real(self, chain, candidates)

    monkeypatch.setattr(Aligner, "draft_deltas", recorded)
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    pair.gate = ScopeGate(np.zeros(len(smollm2_tokenizer), dtype=np.float32), bias, 0.5)

    def answers(on_demand: bool) -> tuple[list[str], list[list[int]]]:
        model = ServedModel(
            "m", FakeRemote(script(WORDS, alternatives=4), on_demand=on_demand), pair=pair, alpha=ALPHA, max_draft_tokens=64
        )
        texts, passes = [], []
        for i, temperature in enumerate((0.0, 0.0, 1.0)):
            chunks.clear()
            params = SamplingParams(max_tokens=40, temperature=temperature, seed=i, alpha=ALPHA)
            ctx = Context(prompt=f"Story number {i}: upon a time")

            async def one(ctx: Context, params: SamplingParams) -> str:
                return "".join([p.text async for p in model.generate(ctx, params)])

            texts.append(asyncio.run(one(ctx, params)))
            passes.append(list(chunks))
        return texts, passes

    whole, _ = answers(on_demand=False)
    as_read, passes = answers(on_demand=True)
    assert as_read[:2] == whole[:2]
    assert answers(on_demand=True)[0][2] == as_read[2]
    if bias > 0:
        assert any("alt" in t for t in whole)  # the offset acts
        for p in passes:
            assert p[0] <= GATED_FIRST_CHUNK and max(p[1:], default=0) <= IN_SCOPE_CHUNK
    else:
        assert not any("alt" in t for t in whole[:2])  # greedy: Δ = 0 everywhere, the remote's tokens
        for p in passes[:2]:
            assert p == [GATED_FIRST_CHUNK, 2 * GATED_FIRST_CHUNK, 40 - 3 * GATED_FIRST_CHUNK]  # one round of 40


@pytest.mark.parametrize("bias", [50.0, -50.0], ids=["gate open", "gate closed"])
def test_a_first_draft_in_scope_is_sized_for_the_in_scope_rate(tiny_base, smollm2_tokenizer, bias):
    """With whole drafts: where the scope gate is open at the first position, the first draft
    is sized for the model's running in-scope acceptance rate at most, not for its overall
    rate (1.0 here, as out-of-scope answers leave it); a seeded request's at T = 1 does not
    depend on that rate (its lengths depend on the request alone); where the gate is closed the draft is as long as
    before. α = 0.001: the pair's own prediction of the first position never shortens it. The
    in-scope rate then moves towards the answer's."""
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    pair.gate = ScopeGate(np.zeros(len(smollm2_tokenizer), dtype=np.float32), bias, 0.5)

    def first_draft(rate: float, **sampling) -> tuple[int, float]:
        remote = FakeRemote(script(WORDS, alternatives=4), top_k_drafts=True)  # T = 1: the law of q
        model = ServedModel("m", remote, pair=pair, alpha=1e-3, max_draft_tokens=64)
        model.scope_acceptance_rate = rate
        params = SamplingParams(max_tokens=40, alpha=1e-3, **sampling)

        async def one() -> None:
            async for _ in model.generate(Context(prompt="Story number 1: upon a time"), params):
                pass

        asyncio.run(one())
        return remote.requested[0], model.scope_acceptance_rate

    assert first_draft(1.0, temperature=0.0)[0] == 40  # max_tokens: nothing shortens it
    capped, rate = first_draft(0.5, temperature=0.0)
    assert first_draft(0.5, temperature=1.0, seed=3)[0] == first_draft(1.0, temperature=1.0, seed=3)[0] == 40
    if bias > 0:
        assert capped < 10
        assert rate > 0.5  # α = 0.001: every drafted token accepted
    else:
        assert capped == 40 and rate == 0.5
