"""The decoding loop on a fake remote: exactness, seeds, stop strings, max_tokens."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fakes import EOT, FakeRemote, normalised, script
from scipy.stats import chisquare

from adapters.base import Candidate, Context, Sample
from proxy.decoding.served import ServedModel
from proxy.decoding.text import TextReleaser
from proxy.decoding.types import ChoiceStats, DecodingError, SamplingParams, TokenOut

KNOWN_DELTA = {b" cat": -2.0, b" dog": 0.5, b" bird": 0.0, b" fish": 1.0}


class KnownDeltaPair:
    """A pair whose Δ is a fixed table by candidate bytes (the exactness oracle)."""

    has_offset = True

    def prompt_ids(self, messages, prompt):
        return [1]

    def aligner(self, prompt_ids, *, same_tokenizer):
        class A:
            last_max_abs_delta = 0.0

            def deltas(self, cands):
                return np.array([KNOWN_DELTA.get(c, 0.0) if c is not None else 0.0 for c in cands])

            def draft_deltas(self, chain, candidates):
                return [self.deltas(c) for c in candidates]

            def commit(self, data):
                pass

        return A()


class PrefixDeltaPair:
    """A pair whose Δ depends on the candidate and on the text before it, so that a
    speculative decoder scoring draft positions ahead of its commits is put to the test."""

    has_offset = True

    @staticmethod
    def delta(text: bytes, c: bytes | None) -> float:
        if c is None:
            return -0.5 * len(text) / 2
        return [1.5, -1.0, 0.3, -2.0][(len(text) + c[-1]) % 4]

    def prompt_ids(self, messages, prompt):
        return [1]

    def aligner(self, prompt_ids, *, same_tokenizer):
        outer = self

        class A:
            last_max_abs_delta = 0.0

            def __init__(self):
                self.text = b""

            def deltas(self, cands):
                return self.draft_deltas([], [cands])[0]

            def draft_deltas(self, chain, candidates):
                out, text = [], self.text
                for j, cands in enumerate(candidates):
                    out.append(np.array([outer.delta(text, c) for c in cands]))
                    if j < len(chain):
                        text += chain[j]
                return out

            def commit(self, data):
                self.text += data or b""

        return A()


def prefix_remote(prefix: bytes):
    """Four tokens whose probabilities depend on the text so far; the turn ends after 3 tokens."""
    if prefix.count(b" ") >= 3:
        return (EOT,)
    shift = len(prefix) % 3
    *words, end, other_end = normalised(
        [(" a", 1.0 - shift), (" b", 0.5), (" c", 0.2 * shift), (" dd", -0.3), ("<end>", -1.0), ("<eos>", -0.5)]
    )
    # Two end-of-turn tokens with the same (empty) bytes: the drafted one must be told apart.
    return (
        *words,
        Candidate(b"", end.logprob, "<|im_end|>", is_eot=True),
        Candidate(b"", other_end.logprob, "<|endoftext|>", is_eot=True),
    )


def exact_sequence_probs(pair, temperature, alpha, top_k, top_p, threshold=None, scope="step"):
    """q of every complete answer, multiplied out position by position (token-by-token decoding's law)."""
    from proxy.decoding.offset import apply_top_p, log_softmax, target_logits

    probs: dict[str, float] = {}

    def walk(prefix: bytes, p: float) -> None:
        cands = sorted(prefix_remote(prefix), key=lambda c: -c.logprob)[:top_k]
        ell = np.array([c.logprob for c in cands])
        delta = np.array([pair.delta(prefix, None if c.is_eot else c.data) for c in cands])
        scores = target_logits(ell, delta, temperature=temperature, alpha=alpha, threshold=threshold, scope=scope)
        logq = apply_top_p(log_softmax(scores), top_p)
        for c, lq in zip(cands, logq, strict=True):
            if not np.isfinite(lq):
                continue
            if c.is_eot:
                probs[prefix.decode()] = probs.get(prefix.decode(), 0.0) + p * np.exp(lq)
            else:
                walk(prefix + c.data, p * np.exp(lq))

    walk(b"", 1.0)
    return probs


def pooled_chisquare_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """The chi-square test's p-value of ``counts`` against ``expected`` counts, the cells
    expected fewer than 5 times pooled into one (the test needs 5 or more per cell)."""
    keep = expected >= 5
    f_obs, f_exp = counts[keep], expected[keep]
    if not keep.all():
        f_obs, f_exp = np.append(f_obs, counts[~keep].sum()), np.append(f_exp, expected[~keep].sum())
    return float(chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue)


def collect(model: ServedModel, params: SamplingParams, index: int = 0, ctx: Context | None = None) -> tuple[str, str]:
    async def run():
        text, finish = [], None
        async for piece in model.generate(
            ctx or Context(messages=({"role": "user", "content": "x"},)), params, index=index
        ):
            text.append(piece.text)
            finish = piece.finish_reason
        return "".join(text), finish

    return asyncio.run(run())


def test_empirical_distribution_matches_q_chi_square():
    """One token drawn from S_t follows q ∝ exp(ℓ/T + α·Δ), not the remote's own law.

    Power: 10,000 draws over 4 candidates (3 degrees of freedom), at α = 0.01, detect a law
    that differs from q by Cohen's w = 0.05 (for instance 0.53/0.27/0.12/0.08 for
    0.50/0.30/0.12/0.08) with probability 0.97; the remote's own law (w ≈ 0.3) is rejected
    with certainty."""
    ell_scores = [(" cat", 2.0), (" dog", 1.0), (" bird", 0.5), (" fish", -0.5)]
    cands = normalised(ell_scores)
    fake = FakeRemote(lambda prefix: cands)
    temperature, alpha = 0.8, 1.0
    model = ServedModel("m", fake, pair=KnownDeltaPair(), alpha=alpha)
    ell = np.array([c.logprob for c in cands])
    delta = np.array([KNOWN_DELTA[c.data] for c in cands])
    q = np.exp(ell / temperature + alpha * delta)
    q /= q.sum()

    async def sample_all(n: int) -> list[bytes]:
        out = []
        for i in range(n):
            async for piece in model.generate(
                Context(prompt="x"), SamplingParams(max_tokens=1, temperature=temperature, seed=1234), index=i
            ):
                if piece.text:
                    out.append(piece.text.encode())
        return out

    n = 10_000
    draws = asyncio.run(sample_all(n))
    counts = np.array([sum(d == c.data for d in draws) for c in cands])
    assert counts.sum() == n
    stat, p = chisquare(counts, q * n)
    assert p > 0.01, (counts, q * n, p)
    # And it is not the remote's own distribution.
    _, p_remote = chisquare(counts, np.exp(ell / temperature) / np.exp(ell / temperature).sum() * n)
    assert p_remote < 1e-6


def test_same_seed_same_output_and_different_choices_differ():
    cands = normalised([(" a", 0.0), (" b", 0.0), (" c", 0.0), (" d", 0.0)])
    model = ServedModel("m", FakeRemote(lambda p: cands))
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    assert collect(model, params) == collect(model, params)
    assert collect(model, params, index=0) != collect(model, params, index=1)


def test_a_seeded_answer_does_not_depend_on_what_the_model_served_before():
    """Speculative decoding sizes its first draft from the model's running acceptance rate,
    which every request moves; a request with a seed starts from its own prior instead, so
    the same seeded request gets the same answer after any other traffic (an audit run with
    another concurrency, or on other workers, gives the same samples)."""

    def long_remote(prefix: bytes):
        """Answers of 12 tokens (drafts of 8, 3 or 2 tokens cut them differently)."""
        if prefix.count(b" ") >= 12:
            return (EOT,)
        shift = len(prefix) % 3
        return normalised([(" a", 1.0 - shift), (" b", 0.5), (" c", 0.2 * shift), (" dd", -0.3)])

    fake = FakeRemote(long_remote, seed=3)
    model = ServedModel("m", fake, pair=PrefixDeltaPair(), alpha=1.0, top_k=4, max_draft_tokens=8)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=21)
    answers = []
    for rate in (1.0, 0.5, 0.05):
        model.acceptance_rate = rate  # what earlier requests left behind
        answers.append([collect(model, params, index=i)[0] for i in range(40)])
    assert answers[0] == answers[1] == answers[2]


def test_greedy_follows_remote_with_alpha_zero_and_offset_changes_it():
    cands = normalised([(" cat", 1.0), (" dog", 0.5)])
    fake = FakeRemote(lambda p: cands if len(p) == 0 else (EOT,))
    model = ServedModel("m", fake, pair=KnownDeltaPair(), alpha=1.0)
    assert collect(model, SamplingParams(max_tokens=5, temperature=0, alpha=0.0))[0] == " cat"
    assert collect(model, SamplingParams(max_tokens=5, temperature=0, alpha=1.0))[0] == " dog"


def test_max_tokens_gives_length_and_eot_gives_stop():
    model = ServedModel("m", FakeRemote(script(["One", " two", " three"])))
    assert collect(model, SamplingParams(max_tokens=2, temperature=0)) == ("One two", "length")
    assert collect(model, SamplingParams(max_tokens=10, temperature=0)) == ("One two three", "stop")


@pytest.mark.parametrize(
    "stop,expected",
    [
        (("two",), "One "),
        ((" th",), "One two"),
        (("ne tw",), "O"),
        (("zzz", "o t"), "One tw"),
        (("three",), "One two "),
    ],
)
def test_stop_strings_also_across_tokens(stop, expected):
    model = ServedModel("m", FakeRemote(script(["One", " two", " three", " four"])))
    assert collect(model, SamplingParams(max_tokens=10, temperature=0, stop=stop)) == (expected, "stop")


def test_releaser_never_splits_a_character_and_drops_unfinished_tail():
    r = TextReleaser(())
    tok = lambda b: TokenOut(b, "", 0.0, (), False)  # noqa: E731
    assert r.push(tok(b"\xc3")).text == ""
    piece = r.push(tok(b"\xa9t\xe2\x82"))
    assert piece.text == "ét" and len(piece.tokens) == 1
    assert r.finish("length").text == ""


def test_releaser_shows_invalid_bytes_instead_of_stalling():
    r = TextReleaser(())
    tok = lambda b: TokenOut(b, "", 0.0, (), False)  # noqa: E731
    assert r.push(tok(b"\xffab")).text == "\ufffdab"
    assert r.push(tok(b"c\xe2\x82")).text == "c"
    assert r.push(tok(b"\xac")).text == "€"


def test_backend_that_cannot_continue_is_refused_for_token_mode():
    with pytest.raises(DecodingError, match="cannot continue"):
        ServedModel("m", FakeRemote(lambda p: (), can_continue=False))


@pytest.mark.parametrize(
    "temperature,top_p,top_k_drafts,on_demand",
    [
        (1.0, 1.0, False, False),
        (0.7, 0.9, False, False),
        (1.0, 1.0, True, False),
        (0.7, 0.9, True, False),
        (1.0, 1.0, False, True),
        (0.7, 0.9, True, True),
    ],
)
def test_speculative_sequences_follow_q_chi_square(temperature, top_p, top_k_drafts, on_demand):
    """Whole answers from speculative acceptance (drafts sampled from the remote's full
    distribution, some drafted tokens outside the top-k S_t, or from its top-k alone;
    whole, or computed as read as an in-process remote does) have the law of
    token-by-token decoding, computed exactly; they are not the remote's own law.

    Power: 3,000 answers over 12 to 34 pooled cells, at α = 0.01, detect a deviation of
    Cohen's w = 0.15 from the exact law with probability 1.0 (w = 0.1: 0.71 to 0.93). The
    remote's own law, what accepting every draft would give, is w = 0.9 to 4.9 away."""
    pair, top_k, alpha = PrefixDeltaPair(), 5, 1.0
    fake = FakeRemote(prefix_remote, seed=3, top_k_drafts=top_k_drafts, on_demand=on_demand)
    model = ServedModel("m", fake, pair=pair, alpha=alpha, top_k=top_k, max_draft_tokens=8)
    want = exact_sequence_probs(pair, temperature, alpha, top_k, top_p)
    remote_only = exact_sequence_probs(pair, 1.0, 0.0, 6, 1.0)

    async def sample_all(n: int) -> list[str]:
        out = []
        for i in range(n):
            params = SamplingParams(max_tokens=10, temperature=temperature, top_p=top_p, seed=99)
            out.append("".join([p.text async for p in model.generate(Context(prompt="x"), params, index=i)]))
        return out

    n = 3000
    draws = asyncio.run(sample_all(n))
    keys = sorted(want)
    assert set(draws) <= set(keys)
    counts = np.array([draws.count(k) for k in keys])
    p = pooled_chisquare_p(counts, np.array([want[k] for k in keys]) * n)
    assert p > 0.01, (dict(zip(keys, counts, strict=True)), p)
    remote_exp = np.array([remote_only.get(k, 0.0) for k in keys]) * n
    assert np.abs(counts - remote_exp).max() > 0.1 * n  # the offset really moved the law
    assert fake.calls < 0.75 * sum(len(d.split(" ")) for d in draws)  # fewer calls than tokens (end of turn included)
    assert fake.drafted > 0
    if on_demand:  # positions computed only as read: fewer than the drafts asked for
        assert fake.drafted < 0.5 * sum(n for n in fake.requested if n > 1)


@pytest.mark.parametrize("scope,on_demand", [("token", False), ("choice", False), ("choice", True)])
def test_speculative_sequences_follow_q_under_a_scope_threshold_chi_square(scope, on_demand):
    """With τ under the token and choice rules, speculative answers keep the exact law of
    token-by-token decoding under the same rule (as the test above, at T = 1; drafts whole or
    computed as read), and the rules give different laws here (the choice rule's whole
    offsets matter)."""
    pair, top_k, alpha, tau = PrefixDeltaPair(), 5, 1.0, 0.5
    fake = FakeRemote(prefix_remote, seed=3, on_demand=on_demand)
    model = ServedModel("m", fake, pair=pair, alpha=alpha, top_k=top_k, max_draft_tokens=8, offset_scope=scope)
    want = exact_sequence_probs(pair, 1.0, alpha, top_k, 1.0, threshold=tau, scope=scope)
    other = exact_sequence_probs(pair, 1.0, alpha, top_k, 1.0, threshold=tau, scope="token" if scope == "choice" else "choice")
    assert max(abs(want.get(k, 0.0) - other.get(k, 0.0)) for k in {*want, *other}) > 0.02
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=99, offset_threshold=tau, offset_scope=scope)

    async def sample_all(n: int) -> list[str]:
        return ["".join([p.text async for p in model.generate(Context(prompt="x"), params, index=i)]) for i in range(n)]

    n = 3000
    draws = asyncio.run(sample_all(n))
    keys = sorted(want)
    assert set(draws) <= set(keys)
    counts = np.array([draws.count(k) for k in keys])
    p = pooled_chisquare_p(counts, np.array([want[k] for k in keys]) * n)
    assert p > 0.01, (dict(zip(keys, counts, strict=True)), p)


def test_top_k_drafts_are_all_accepted_out_of_scope_at_temperature_one():
    """With Δ ≡ 0 (α = 0) at T = 1, q_t is the remote's law over its top-k: drafts drawn
    from the top-k renormalised are all accepted, and one call serves each answer; drafts
    drawn from the whole vocabulary are rejected whenever they come from the tail."""

    def run(top_k_drafts: bool) -> tuple[int, int, FakeRemote]:
        fake = FakeRemote(prefix_remote, seed=11, top_k_drafts=top_k_drafts)
        model = ServedModel("m", fake, pair=PrefixDeltaPair(), alpha=0.0, top_k=3, max_draft_tokens=8)
        drafted = accepted = 0

        async def go() -> None:
            nonlocal drafted, accepted
            for i in range(200):
                stats = ChoiceStats()
                params = SamplingParams(max_tokens=8, temperature=1.0, alpha=0.0, seed=5)
                async for _ in model.generate(Context(prompt="x"), params, index=i, stats=stats):
                    pass
                drafted, accepted = drafted + stats.draft_tokens, accepted + stats.accepted_tokens

        asyncio.run(go())
        return drafted, accepted, fake

    drafted, accepted, fake = run(True)
    assert accepted == drafted > 0
    assert fake.calls == 200
    drafted, accepted, _ = run(False)
    assert accepted < 0.9 * drafted


def test_speculative_greedy_equals_token_by_token_and_saves_calls():
    def run(speculative: bool, alpha: float) -> tuple[str, int]:
        fake = FakeRemote(prefix_remote)
        model = ServedModel("m", fake, pair=PrefixDeltaPair(), alpha=alpha, top_k=4, speculative=speculative)
        text, _ = collect(model, SamplingParams(max_tokens=10, temperature=0, alpha=alpha))
        return text, fake.calls

    for alpha in (0.0, 1.0, 3.0):
        (spec, spec_calls), (tbt, tbt_calls) = run(True, alpha), run(False, alpha)
        assert spec_calls <= tbt_calls
        assert spec == tbt
        assert tbt_calls == len(spec.split(" ")) - 1 + 1  # one call per token, the end of turn included
    assert run(True, 0.0)[1] == 1  # out of scope: one call for the whole answer


class PredictingPrefixDeltaPair(PrefixDeltaPair):
    """:class:`PrefixDeltaPair` whose aligner also gives the pair's own next-token rows
    (:meth:`proxy.decoding.alignment.Aligner.next_rows`): after an even number of bytes they
    predict a rejection (U moves all of B's mass to another token), after an odd one
    none (U = B)."""

    def aligner(self, prompt_ids, *, same_tokenizer):
        inner = super().aligner(prompt_ids, same_tokenizer=same_tokenizer)

        def next_rows():
            lb = np.log([0.9, 0.1])
            return (np.log([0.01, 0.99]) if len(inner.text) % 2 == 0 else lb), lb

        inner.next_rows = next_rows
        return inner


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_predicted_rejections_shorten_drafts_and_keep_the_law(temperature):
    """Where the pair predicts a rejection at a draft's first position, the draft asks
    for 2 tokens instead of the maximum; the answers' law is still token-by-token
    decoding's (chi-square; greedy: the same text), since only draft lengths change.

    Power: 2,000 answers over 32 pooled cells, at α = 0.01, detect w = 0.15 with probability
    0.95 (w = 0.1: 0.43); draft lengths cannot change the law at all."""
    pair, top_k, alpha = PredictingPrefixDeltaPair(), 5, 1.0
    fake = FakeRemote(prefix_remote, seed=5)
    model = ServedModel("m", fake, pair=pair, alpha=alpha, top_k=top_k, max_draft_tokens=16)
    params = SamplingParams(max_tokens=10, temperature=temperature, seed=7)

    async def sample_all(n: int) -> list[str]:
        out = []
        for i in range(n):
            out.append("".join([p.text async for p in model.generate(Context(prompt="x"), params, index=i)]))
        return out

    n = 2000 if temperature else 1
    draws = asyncio.run(sample_all(n))
    assert fake.requested[0] <= 3  # the first position is predicted to be rejected: 2 / (1 − 0.11) tokens
    if temperature == 0:
        plain = ServedModel("m", FakeRemote(prefix_remote), pair=PrefixDeltaPair(), alpha=alpha, top_k=top_k)
        assert draws[0] == collect(plain, params)[0]
        return
    assert max(fake.requested) > 3  # after an odd number of bytes no rejection is predicted
    want = exact_sequence_probs(pair, temperature, alpha, top_k, 1.0)
    keys = sorted(want)
    counts = np.array([draws.count(k) for k in keys])
    p = pooled_chisquare_p(counts, np.array([want[k] for k in keys]) * n)
    assert p > 0.01, (dict(zip(keys, counts, strict=True)), p)


def test_draft_length_for_a_predicted_rate():
    from proxy.decoding.speculative import DraftLength

    lengths = DraftLength(64)
    assert lengths.length_for(0.0) == 2 and lengths.length_for(0.5) == 4 and lengths.length_for(0.75) == 8
    assert lengths.length_for(1 - 2 / 64) == 64 and lengths.length_for(1.0) == 64


def test_draft_length_follows_the_acceptance_rate():
    from proxy.decoding.speculative import DraftLength

    lengths = DraftLength(64)
    assert lengths.next(1000) == 64 and lengths.next(10) == 10
    lengths.update(0, 1)  # one early rejection does not collapse the draft length
    assert 16 <= lengths.next(1000) < 64
    for _ in range(30):  # in scope: about one token in four rejected
        lengths.update(3, 4)
    assert 0.7 < lengths.rate < 0.8 and lengths.next(1000) <= 9
    for _ in range(12):  # back out of scope: whole drafts accepted
        lengths.update(32, 32)
    assert lengths.next(1000) == 64
    assert lengths.examined == 1 + 30 * 4 + 12 * 32 and lengths.accepted == 30 * 3 + 12 * 32


def test_the_best_draft_length_commits_the_most_tokens_per_second():
    from proxy.decoding.speculative import DraftLength

    lengths = DraftLength(64)

    def committed(rate: float, length: int) -> float:
        return (1 - rate**length) / (1 - rate)

    for rate in (0.3, 0.7, 0.9, 0.97):
        floor = min(DraftLength.MIN_COMMITTED, 0.9 * committed(rate, 64))
        allowed = [n for n in range(1, 65) if committed(rate, n) >= floor]
        for ratio in (0.0, 1.0, 2.5, 16.0, 200.0):
            best = lengths.best_length(rate, ratio)
            assert best in allowed  # at most about 20 calls per 100 tokens where a draft can
            per_second = [committed(rate, n) / (ratio + n) for n in allowed]
            assert committed(rate, best) / (ratio + best) == pytest.approx(max(per_second))
    # a cheap call (a local remote): short drafts in scope; an expensive one: long drafts
    assert lengths.best_length(0.9, 2.5) <= 8 and lengths.best_length(0.9, 200.0) >= 30
    assert lengths.best_length(0.3, 0.0) == 2  # E(2) = 1.3 is 90% of the most a draft commits
    assert lengths.best_length(1.0, 0.0) == 64 and lengths.best_length(0.5, float("inf")) == 64


def test_the_draft_cost_is_fitted_from_the_rounds_seen():
    from proxy.decoding.speculative import DraftCost, DraftLength

    cost = DraftCost()
    assert cost.ratio() == DraftCost.PRIOR_RATIO
    for n in (4, 4, 4, 4, 4, 4):  # one length: a and b cannot be told apart
        cost.observe(n, 0.2 + 0.05 * n)
    assert cost.ratio() == DraftCost.PRIOR_RATIO
    for n in (1, 8, 30, 2, 64, 5, 12, 3):
        cost.observe(n, 0.2 + 0.05 * n)  # a = 0.2 s per round, b = 0.05 s per token
    assert cost.ratio() == pytest.approx(4.0, rel=1e-6)
    lengths = DraftLength(64, 0.9, cost=cost)
    assert lengths.length_for(0.9) == lengths.best_length(0.9, 4.0)
    free = DraftCost()
    for n in (1, 8, 30, 2, 64):
        free.observe(n, 0.5)  # tokens cost nothing measurable
    assert free.ratio() == float("inf") and DraftLength(64, cost=free).length_for(0.5) == 64
    cost.observe(0, 1.0)
    cost.observe(3, float("nan"))
    assert cost.rounds == 14  # empty or unmeasured rounds are not counted


def test_sequence_weights_match_hand_computed_ones():
    from proxy.decoding.sequence_mode import sequence_weights

    w = sequence_weights(np.array([-3.0, 0.0, 1.0, -np.inf]), alpha=2.0)
    hand = np.array([np.exp(-6.0), 1.0, np.exp(2.0), 0.0]) / (np.exp(-6.0) + 1.0 + np.exp(2.0))
    assert np.allclose(w, hand, rtol=1e-12, atol=0)
    assert np.allclose(sequence_weights(np.array([-np.inf, -np.inf]), 1.0), [0.5, 0.5])
    assert np.allclose(sequence_weights(np.array([5.0, -5.0]), 0.0), [0.5, 0.5])  # α = 0: the remote's own law


class SequencePair(PrefixDeltaPair):
    """ΣΔ of a whole answer: the sum of the per-token table along it (tokens are space-led
    words; id 0 ends the turn, and each new word gets the next id)."""

    def __init__(self):
        from proxy.decoding.vocab import ByteVocab

        self.words: list[bytes | None] = [None]
        self.vocab = ByteVocab([None, *(bytes([b]) for b in range(256))], (0,))  # ids only matter here

    def encode_answer(self, text):
        ids, spans, pos = [], [], 0
        for w in [" " + w for w in text.split(" ")[1:]]:
            data = w.encode()
            if data not in self.words:
                self.words.append(data)
            ids.append(self.words.index(data))
            spans.append((pos, pos + len(w)))
            pos += len(w)
        return ids, spans

    def answer_scores(self, prompt_ids, ids, top_k):
        from proxy.decoding.types import AnswerScores

        done, deltas = b"", []
        for i in ids:
            w = self.words[i] if i != 0 else None
            deltas.append(self.delta(done, w))
            done += w or b""
        d = np.array(deltas)
        empty = np.zeros((len(ids), 0))
        return AnswerScores(np.full(len(ids), -1.0), d, d, empty.astype(np.int64), empty, empty)

    def sequence_offset(self, prompt_ids, text, end_of_turn):
        data, total, done = text.encode(), 0.0, b""
        words = [b" " + w for w in data.split(b" ")[1:]]
        for w in words:
            total += self.delta(done, w)
            done += w
        if end_of_turn:
            total += self.delta(done, None)
        return total, len(words) + int(end_of_turn)


def test_sequence_mode_weights_each_sample_by_exp_alpha_sum_delta():
    pair = SequencePair()
    fake = FakeRemote(prefix_remote, seed=5)
    model = ServedModel("m", fake, pair=pair, alpha=1.0, mode="sequence", sequence_samples=4)
    stats = ChoiceStats()
    text, finish = asyncio.run(_first(model, SamplingParams(max_tokens=10, temperature=1.0, seed=3), stats))
    assert fake.samples == 4 and stats.remote_calls == 4 and finish == "stop"
    # Hand-computed weights of the four samples the fake drew.
    sums = np.array([pair.sequence_offset([1], t, True)[0] for t in stats.sample_texts])
    assert np.allclose(stats.sequence_weights, np.exp(sums - sums.max()) / np.exp(sums - sums.max()).sum())
    assert text in stats.sample_texts


def test_sequence_mode_draws_answers_in_proportion_to_their_weights_chi_square():
    """Sequence mode picks among the samples with weights exp(α·ΣΔ) normalised.

    Power: 2,000 picks over 4 answers (3 degrees of freedom), at α = 0.01, detect w = 0.1
    with probability 0.91; uniform picks (the weights ignored) are w ≈ 2 away."""
    texts = [" a b c", " b b b", " dd a", " c"]

    class FixedSamples(FakeRemote):
        async def sample(self, ctx, **kw):
            self.samples += 1
            return Sample(texts[(self.samples - 1) % 4], "stop", 7, 4)

    pair = SequencePair()
    model = ServedModel("m", FixedSamples(prefix_remote), pair=pair, alpha=0.7, mode="sequence", sequence_samples=4)
    sums = np.array([pair.sequence_offset([1], t, True)[0] for t in texts])
    want = np.exp(0.7 * sums) / np.exp(0.7 * sums).sum()
    n = 2000
    picks = [
        asyncio.run(_first(model, SamplingParams(max_tokens=5, temperature=1.0, seed=i, alpha=0.7), ChoiceStats()))[0]
        for i in range(n)
    ]
    counts = np.array([picks.count(t) for t in texts])
    assert chisquare(counts, want * n).pvalue > 0.01, (counts, want * n)


def test_sequence_mode_refuses_when_every_sample_is_in_forget_scope():
    pair = SequencePair()
    fake = FakeRemote(prefix_remote, seed=5)
    model = ServedModel("m", fake, pair=pair, alpha=1.0, mode="sequence", offset_threshold=0.0, refusal="Sorry, no.")
    model.pair.delta = staticmethod(lambda text, c: -1.0)  # every token deep in scope
    params = SamplingParams(max_tokens=10, temperature=1.0, offset_threshold=0.0)
    text, finish = asyncio.run(_first(model, params, ChoiceStats()))
    assert (text, finish) == ("Sorry, no.", "stop")


def test_token_mode_on_a_remote_that_cannot_continue_points_to_sequence_mode():
    with pytest.raises(DecodingError, match='decoding = "sequence"'):
        ServedModel("m", FakeRemote(prefix_remote, can_continue=False))
    ServedModel("m", FakeRemote(prefix_remote, can_continue=False), mode="sequence")


async def _first(model, params, stats):
    out = [p async for p in model.generate(Context(messages=({"role": "user", "content": "x"},)), params, stats=stats)]
    return "".join(p.text for p in out), out[-1].finish_reason


def test_sequence_mode_refuses_to_continue_a_partial_answer():
    model = ServedModel("m", FakeRemote(prefix_remote, can_continue=False), mode="sequence")
    ctx = Context(messages=({"role": "user", "content": "x"},), assistant_prefix=b"Partial")

    async def run():
        return [p async for p in model.generate(ctx, SamplingParams(max_tokens=5))]

    with pytest.raises(DecodingError, match="cannot continue a partial answer"):
        asyncio.run(run())


def test_a_copy_of_a_model_on_a_shared_pair_keeps_the_pair_thread():
    """dataclasses.replace of a model whose pair owns the one pair thread (as
    bench.tofu does to set τ) must not shut that thread down for both copies."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    pair = PrefixDeltaPair()
    pair.executor = ThreadPoolExecutor(1)
    model = ServedModel("m", FakeRemote(prefix_remote), pair=pair)
    copy = dataclasses.replace(model, offset_threshold=1.0)
    assert copy._pool is model._pool is pair.executor
    for m in (model, copy):
        assert collect(m, SamplingParams(max_tokens=3, temperature=0))[0]
    pair.executor.shutdown()


def test_one_rule_says_which_candidate_the_remote_drafted():
    """:func:`adapters.base.find_token`, the rule that speculative acceptance needs to be exact:
    ids decide where both entries carry one; otherwise bytes and token string, and end-of-turn
    entries by their strings; unknown bytes match nothing."""
    from adapters.base import Candidate, find_token

    cands = [
        Candidate(b"Hi", -0.5, "Hi"),
        Candidate(b"", -1.0, "<|im_end|>", is_eot=True),
        Candidate(b"Hi", -2.0, "Hi", token_id=7),
    ]
    assert find_token(Candidate(b"Hi", -0.1, "Hi"), cands) == 0
    assert find_token(Candidate(b"", -0.1, "<|im_end|>", is_eot=True), cands) == 1
    assert find_token(Candidate(b"", -0.1, "</s>", is_eot=True), cands) is None
    assert find_token(Candidate(None, -0.1, "Hi"), cands) is None
    assert find_token(Candidate(b"Ho", -0.1, "Ho", token_id=7), cands[2:]) == 0  # the ids decide
