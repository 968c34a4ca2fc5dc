"""The in-process transformers remote's batched drafts (:mod:`adapters.step_batcher`):
concurrent requests' tokens as rows of one pass of the lean body, each row on its own
KV cache, give the positions that drafting each request alone gives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from adapters.base import Context, ContextExhausted, RemoteUnavailable
from adapters.step_batcher import StepBatcher
from adapters.transformers_inprocess import TransformersInProcessAdapter
from proxy.pair.lean import LeanDecoder

QUESTIONS = (
    "Where was Velokro Raidyr born?",
    "Name a colour.",
    "What is the capital of a country that does not exist yet, in your view?",
    "Hi",
    "Where was Velokro Raidyr born?",  # the same prompt twice: two rows, two caches
)


def _ctx(q: str) -> Context:
    return Context(messages=({"role": "user", "content": q},))


def _same(a, b) -> None:
    assert [p.sampled.token_id for p in a.positions] == [p.sampled.token_id for p in b.positions]
    assert a.finish_reason == b.finish_reason and a.prompt_tokens == b.prompt_tokens
    for pa, pb in zip(a.positions, b.positions, strict=True):
        assert [c.token_id for c in pa.candidates] == [c.token_id for c in pb.candidates]
        np.testing.assert_allclose([c.logprob for c in pa.candidates], [c.logprob for c in pb.candidates], atol=1e-4)


@pytest.mark.parametrize("greedy", [True, False])
def test_concurrent_drafts_are_batched_and_match_drafting_alone(remote_dir, greedy):
    serial = TransformersInProcessAdapter(name="r", model_dir=remote_dir)
    batched = TransformersInProcessAdapter(name="r", model_dir=remote_dir, body=LeanDecoder.build)
    assert batched._steps is not None

    async def drafts(adapter):
        return await asyncio.gather(
            *(adapter.draft(_ctx(q), n_tokens=12, top_k=5, seed=i, greedy=greedy) for i, q in enumerate(QUESTIONS))
        )

    alone = [
        asyncio.run(serial.draft(_ctx(q), n_tokens=12, top_k=5, seed=i, greedy=greedy)) for i, q in enumerate(QUESTIONS)
    ]
    together = asyncio.run(drafts(batched))
    for a, b in zip(alone, together, strict=True):
        _same(a, b)
    # every request's cache is kept: the two drafts of the same prompt did not crop each other's
    held = [tuple(slot.tokens) for slot in batched._slots.slots]
    for q, d in zip(QUESTIONS, together, strict=True):
        ids = batched.prompt_tokens(_ctx(q)) + [p.sampled.token_id for p in d.positions]
        assert tuple(ids[: len(ids) - 1]) in held or (d.finish_reason == "stop" and tuple(ids[:-2]) in held)
    steps = batched._steps
    assert steps.jobs == sum(len(d.positions) for d in together)
    assert steps.batches <= steps.jobs / 3  # rows of several requests per pass

    # again, from the caches the first drafts left: a continuation reuses its request's cache
    again = asyncio.run(drafts(batched))
    for a, b in zip(alone, again, strict=True):
        _same(a, b)
    ctx = Context(
        messages=_ctx(QUESTIONS[0]).messages, token_ids=tuple(p.sampled.token_id for p in alone[0].positions[:5])
    )
    _same(
        asyncio.run(serial.draft(ctx, n_tokens=4, top_k=5, seed=9)),
        asyncio.run(batched.draft(ctx, n_tokens=4, top_k=5, seed=9)),
    )


def test_a_draft_past_the_context_or_after_closing_fails_alone(remote_dir):
    adapter = TransformersInProcessAdapter(name="r", model_dir=remote_dir, body=LeanDecoder.build)
    n_prompt = len(adapter.prompt_tokens(_ctx("Hi")))
    adapter.max_length = n_prompt + 3

    async def both():
        return await asyncio.gather(
            adapter.draft(_ctx("Hi"), n_tokens=8, top_k=3, greedy=True),
            adapter.draft(_ctx("Hi"), n_tokens=2, top_k=3, greedy=True),
            return_exceptions=True,
        )

    long, short = asyncio.run(both())
    assert isinstance(long, ContextExhausted)
    assert len(short.positions) == 2
    asyncio.run(adapter.aclose())
    with pytest.raises(RemoteUnavailable):
        asyncio.run(adapter.draft(_ctx("Hi"), n_tokens=2, top_k=3))


def test_a_model_the_body_does_not_take_drafts_one_at_a_time(remote_dir):
    adapter = TransformersInProcessAdapter(name="r", model_dir=remote_dir, body=lambda model: None)
    assert adapter._steps is None
    assert len(asyncio.run(adapter.draft(_ctx("Hi"), n_tokens=3, top_k=3, greedy=True)).positions) == 3


def test_the_step_batcher_fails_only_the_job_that_raised_and_survives_event_loops():
    seen: list[list[int]] = []

    def run(jobs: list[int]):
        seen.append(list(jobs))
        if 99 in jobs and len(jobs) == 1:
            raise RuntimeError("the whole batch")
        return [ValueError(j) if j < 0 else j * 2 for j in jobs]

    batcher: StepBatcher[int, int] = StepBatcher(run, None, max_batch=3)

    async def main():
        return await asyncio.gather(*(batcher.submit(j) for j in (1, -2, 3, 4, 5)), return_exceptions=True)

    for _ in range(2):  # a second asyncio.run: a new loop
        seen.clear()
        out = asyncio.run(main())
        assert out[0] == 2 and out[2:] == [6, 8, 10] and isinstance(out[1], ValueError)
        assert seen == [[1, -2, 3], [4, 5]]
    with pytest.raises(RuntimeError, match="whole batch"):
        asyncio.run(batcher.submit(99))


def test_a_pass_that_fails_leaves_no_cache_behind(remote_dir, monkeypatch):
    """A batched pass that fails after extending its rows' caches drops them: the next drafts
    start over and match drafting alone."""
    serial = TransformersInProcessAdapter(name="r", model_dir=remote_dir)
    adapter = TransformersInProcessAdapter(name="r", model_dir=remote_dir, body=LeanDecoder.build)
    first = asyncio.run(adapter.draft(_ctx("Hi"), n_tokens=4, top_k=3, greedy=True))
    # the draft's cache holds the prompt and its first 3 tokens: a continuation extends it in place
    ctx = Context(messages=_ctx("Hi").messages, token_ids=tuple(p.sampled.token_id for p in first.positions))
    rows = adapter._body.rows

    def extend_then_fail(*args):
        rows(*args)
        raise RuntimeError("out of memory half-way")

    monkeypatch.setattr(adapter._body, "rows", extend_then_fail)
    with pytest.raises(RuntimeError, match="half-way"):
        asyncio.run(adapter.draft(ctx, n_tokens=3, top_k=3, greedy=True))
    monkeypatch.setattr(adapter._body, "rows", rows)
    _same(asyncio.run(serial.draft(ctx, n_tokens=3, top_k=3)), asyncio.run(adapter.draft(ctx, n_tokens=3, top_k=3)))
