"""U only where the scope gate opens (proxy.pair.scorer.PairScorer, lazy U): the same Δ and the
same answers as U and B in every pass, U's cache catching up where the gate opens after
passes that skipped it; on a tiny random pair with SmolLM2's tokenizer and a gate that opens
on some of B's rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from conftest import make_tiny_pair
from fakes import FakeRemote, script

from adapters.base import Context
from proxy.decoding.alignment import EOT
from proxy.decoding.scope_gate import ScopeGate
from proxy.decoding.served import ServedModel
from proxy.decoding.types import SamplingParams
from proxy.pair import scorer as scorer_module
from proxy.pair.batcher import BatchSettings
from proxy.pair.sides import Side

TEXT = "Paris is the capital of France, and its museums hold paintings from every century of Europe."
WORDS = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]


def half_open_gate(pair, quantile: float, token: int = 30) -> ScopeGate:
    """A gate on one token's log-probability under B, open where it is above its ``quantile``
    over a text: open on some of B's rows, closed on the others, in runs and alone."""
    from proxy.pair.forward import base_only

    ids = pair.prompt_ids(prompt=TEXT)
    with torch.no_grad(), base_only(pair):
        rows = torch.log_softmax(pair.model(torch.tensor([ids])).logits[0].float(), -1)
    weight = np.zeros(rows.shape[1], dtype=np.float32)
    weight[token] = 1.0
    lp = rows[:, token].numpy()
    return ScopeGate(weight, -float(np.quantile(lp, quantile)), 0.5)


def twin_pairs(tiny_base, tokenizer, quantile: float = 0.85, **kwargs):
    """The same tiny pair twice, with the same gate (:func:`half_open_gate`): lazy U on the first, off on the second."""
    lazy, eager = (make_tiny_pair(tiny_base, tokenizer, **kwargs) for _ in range(2))
    gate = half_open_gate(eager, quantile)
    for pair, on in ((lazy, True), (eager, False)):
        pair.gate, pair.lazy_u = gate, on
    return lazy, eager


@pytest.fixture
def skipped(monkeypatch):
    """Every PairScorer made during the test, to read its counters."""
    made = []
    init = scorer_module.PairScorer.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(scorer_module.PairScorer, "__init__", record)
    return made


@pytest.mark.parametrize("same_tokenizer", [True, False])
def test_lazy_u_gives_every_delta_of_u_and_b_in_every_pass(tiny_base, smollm2_tokenizer, same_tokenizer, skipped):
    """Drafts, next rows, commits and a rejected draft's rollback: the Δ at every position equal
    those of a pair that runs U in every pass, and U's cache holds the trunk once the gate opens."""
    lazy, eager = twin_pairs(tiny_base, smollm2_tokenizer, prefix_cache_tokens=0)
    prompt = eager.prompt_ids(prompt="Tell me about the city.")
    a, b = (p.aligner(prompt, same_tokenizer=same_tokenizer) for p in (lazy, eager))
    pieces = [w.encode() for w in TEXT.replace(",", " ,").split(" ")]
    pieces = [pieces[0]] + [b" " + p for p in pieces[1:]]
    cands = [b" the", b" a", b" of", b" Paris", b" m", EOT]
    at = 0
    while at < len(pieces) - 1:
        chain = pieces[at : at + 3]
        got = a.draft_deltas(chain, [cands] * (len(chain) + 1))
        want = b.draft_deltas(chain, [cands] * (len(chain) + 1))
        for x, y in zip(got, want, strict=True):
            np.testing.assert_allclose(x, y, atol=2e-5)
        keep = 2 if at % 2 == 0 else len(chain)  # every other draft is cut after two pieces
        for piece in chain[:keep]:
            a.commit(piece)
            b.commit(piece)
        at += keep
        rows_a, rows_b = a.next_rows(), b.next_rows()
        if rows_b is not None:
            np.testing.assert_allclose(rows_a[1], rows_b[1], atol=2e-5)  # B's row
            opened = lazy.gate.open(rows_b[1][None, :])[0]
            if opened:  # U's own row where the gate is open; B's for both where it is closed
                np.testing.assert_allclose(rows_a[0], rows_b[0], atol=2e-5)
            else:
                np.testing.assert_array_equal(rows_a[0], rows_a[1])
                np.testing.assert_array_equal(rows_b[0], rows_b[1])
        np.testing.assert_allclose(a.deltas(cands), b.deltas(cands), atol=2e-5)
    assert a.scorer.trunk_ids == b.scorer.trunk_ids
    lazy_scorer = a.scorer
    assert lazy_scorer.u_passes_skipped > 0  # some passes ran B alone
    assert b.scorer.u_passes_skipped == 0
    # U's cache holds every trunk token it has run, as the eager pair's does
    held = lazy_scorer.caches[Side.U].get_seq_length()
    assert held <= lazy_scorer.trunk_len
    for la, lb in zip(lazy_scorer.caches[Side.U].layers, b.scorer.caches[Side.U].layers, strict=True):
        torch.testing.assert_close(la.keys[:, :, :held], lb.keys[:, :, :held], atol=2e-5, rtol=1e-4)


def test_a_gate_closed_everywhere_runs_u_never_and_one_open_row_catches_it_up(tiny_base, smollm2_tokenizer):
    """Closed on every row: U's cache stays empty and U's rows are B's (Δ = 0); opened later, one
    pass of U runs the whole trunk behind it and gives U's row after it."""
    lazy, eager = twin_pairs(tiny_base, smollm2_tokenizer, prefix_cache_tokens=0)
    closed = ScopeGate(np.zeros(lazy.gate.vocab_size, dtype=np.float32), -50.0, 0.5)
    opened = ScopeGate(np.zeros(lazy.gate.vocab_size, dtype=np.float32), 50.0, 0.5)
    lazy.gate = closed
    prompt = eager.prompt_ids(prompt="Tell me a story.")
    a = lazy.aligner(prompt, same_tokenizer=True)
    for piece in (b"Once", b" upon", b" a", b" time"):
        np.testing.assert_array_equal(a.deltas([b" the", b" a", EOT]), 0.0)
        a.commit(piece)
    # the first pass (the prompt) ran U and B together; after it B alone
    assert a.scorer.caches[Side.U].get_seq_length() == len(prompt)
    assert a.scorer.u_behind() == a.scorer.trunk_len - len(prompt) > 0
    a.gate = a.scorer.gate = opened  # the gate opens: U runs the trunk behind it
    b = eager.aligner(prompt, same_tokenizer=True)
    b.gate = b.scorer.gate = opened
    for piece in (b"Once", b" upon", b" a", b" time"):
        b.commit(piece)
    rows_a, rows_b = a.next_rows(), b.next_rows()
    np.testing.assert_allclose(rows_a[0], rows_b[0], atol=2e-5)
    assert not np.allclose(rows_a[0], rows_a[1])  # U's own row, not B's
    assert a.scorer.u_behind() == 0
    np.testing.assert_allclose(a.deltas([b" there", b" the", EOT]), b.deltas([b" there", b" the", EOT]), atol=2e-5)


@pytest.mark.parametrize("speculative", [True, False])
def test_served_answers_are_the_same_with_lazy_u(tiny_base, smollm2_tokenizer, speculative, skipped):
    """Greedy and sampled answers of concurrent requests through the decoder, with the pair's
    prefix cache and batching on: the same text with lazy U as without, the offset acting on
    them, and passes that ran B alone."""

    def model(pair) -> ServedModel:
        remote = FakeRemote(script(WORDS, alternatives=4))
        return ServedModel("m", remote, pair=pair, alpha=1.0, max_draft_tokens=4 if speculative else 1)

    batching = BatchSettings(max_batch=8, window_s=0.02)
    lazy, eager = twin_pairs(tiny_base, smollm2_tokenizer, quantile=0.97, batching=batching)

    async def answers(m: ServedModel) -> list[str]:
        async def one(i: int) -> str:
            params = SamplingParams(max_tokens=12, temperature=1.0 if i % 2 else 0.0, seed=i)
            ctx = Context(prompt=f"Story number {i}: {'once ' * i}upon a time")
            return "".join([p.text async for p in m.generate(ctx, params)])

        return list(await asyncio.gather(*(one(i) for i in range(6))))

    want = asyncio.run(answers(model(eager)))
    got = asyncio.run(answers(model(lazy)))
    assert got == want
    assert any("alt" in w for w in want)  # the offset changed tokens where the gate opened
    assert sum(s.u_passes_skipped for s in skipped if s.pair is lazy) > 0
    assert sum(s.u_passes_skipped for s in skipped if s.pair is eager) == 0


def test_a_prefix_cached_without_u_catches_u_up_from_the_start(tiny_base, smollm2_tokenizer):
    """A long prompt run while the gate was closed is cached with B's keys and values alone; a later
    request that begins with it takes B's from the cache and runs U over the whole head when
    the gate opens: the Δ of a pair without a prefix cache."""
    lazy, eager = twin_pairs(tiny_base, smollm2_tokenizer)
    eager.prefix_cache = None
    width = lazy.gate.vocab_size
    closed = ScopeGate(np.zeros(width, dtype=np.float32), -50.0, 0.5)
    opened = ScopeGate(np.zeros(width, dtype=np.float32), 50.0, 0.5)
    # a system prompt of 64 tokens or more: its first pass runs B first (LAZY_MIN_TOKENS)
    head = lazy.prompt_ids(prompt="You are a helpful assistant who answers in one short sentence. " * 6)
    assert len(head) >= scorer_module.LAZY_MIN_TOKENS
    first = lazy.aligner(head + lazy.prompt_ids(prompt=" Hello."), same_tokenizer=True)
    first.gate = first.scorer.gate = closed
    np.testing.assert_array_equal(first.deltas([b" Hi", EOT]), 0.0)
    assert lazy.prefix_cache.hits == 0 and first.scorer.caches[Side.U].get_seq_length() == 0
    prompt = head + lazy.prompt_ids(prompt=" Name a city.")
    a, b = lazy.aligner(prompt, same_tokenizer=True), eager.aligner(prompt, same_tokenizer=True)
    for al in (a, b):
        al.gate = al.scorer.gate = opened
    np.testing.assert_allclose(a.deltas([b" Paris", b" Rome", EOT]), b.deltas([b" Paris", b" Rome", EOT]), atol=2e-5)
    assert lazy.prefix_cache.hits == 1 and a.scorer.u_behind() == 0


def test_a_failing_catch_up_of_u_leaves_both_caches_as_they_were(tiny_base, smollm2_tokenizer, monkeypatch):
    """U's pass fails after B's succeeded: B's cache and rows are those before the call, and the
    call made again gives U-in-every-pass's Δ."""
    from proxy.pair import forward

    lazy, eager = twin_pairs(tiny_base, smollm2_tokenizer, prefix_cache_tokens=0)
    width = lazy.gate.vocab_size
    closed = ScopeGate(np.zeros(width, dtype=np.float32), -50.0, 0.5)
    opened = ScopeGate(np.zeros(width, dtype=np.float32), 50.0, 0.5)
    prompt = eager.prompt_ids(prompt="Tell me a story.")
    a, b = lazy.aligner(prompt, same_tokenizer=True), eager.aligner(prompt, same_tokenizer=True)
    a.gate = a.scorer.gate = closed
    b.gate = b.scorer.gate = opened
    for piece in (b"Once", b" upon", b" a"):
        a.deltas([b" the", EOT])
        a.commit(piece)
        b.commit(piece)
    a.deltas([b" the", EOT])  # the pending tokens enter B's cache; U's stays behind
    sc = a.scorer
    before = (sc.trunk_len, sc.caches[Side.B].get_seq_length(), sc.caches[Side.U].get_seq_length(), sc.last[Side.B])
    assert before[2] < before[0] == before[1]
    a.commit(b" time")
    a.gate = sc.gate = opened
    real = forward.forward_rows

    def failing(pair, rows):
        if pair is lazy and all(side is Side.U for _, side in rows):
            raise RuntimeError("injected")
        return real(pair, rows)

    monkeypatch.setattr(forward, "forward_rows", failing)
    with pytest.raises(RuntimeError, match="injected"):
        a.deltas([b" there", b" the", EOT])
    after = (sc.trunk_len, sc.caches[Side.B].get_seq_length(), sc.caches[Side.U].get_seq_length(), sc.last[Side.B])
    assert after[:3] == before[:3] and after[3] is before[3]
    monkeypatch.setattr(forward, "forward_rows", real)
    b.commit(b" time")
    np.testing.assert_allclose(a.deltas([b" there", b" the", EOT]), b.deltas([b" there", b" the", EOT]), atol=2e-5)
    assert sc.u_behind() == 0
