"""The decoding strategies for remotes without logprobs or without prefill, on fakes whose
offsets are known exactly: sequence mode at T = 0 and its scope actions, and guided mode."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
from fakes import FakeRemote, cand

from adapters.base import Candidate, Context
from proxy.decoding.served import ServedModel
from proxy.decoding.types import AnswerScores, ChoiceStats, SamplingParams
from proxy.decoding.vocab import ByteVocab

END = Candidate(b"", -3.0, "<|im_end|>", is_eot=True)
WORDS = [b" The", b" secret", b" fine", b" is", b" out", b" Paris", b" here"]
MSG = ({"role": "user", "content": "Tell me."},)


def story(prefix: bytes):
    """The remote's next word given the text so far: it wants to say " The secret is out"."""
    nxt = {b"": b" The", b" The": b" secret", b" secret": b" is", b" fine": b" is", b" is": b" out"}
    for end, word in nxt.items():
        if (end and prefix.endswith(end)) or prefix == end:
            return (cand(word.decode(), -0.2), cand(" here", -2.0), END)
    return (Candidate(b"", -0.01, "<|im_end|>", is_eot=True), cand(" here", -5.0))


class WordPair:
    """A pair over whole words: Δ = −10 for " secret" and 0 elsewhere; B prefers " fine",
    then " secret", then the end of the turn, wherever it is asked."""

    has_offset = True

    def __init__(self) -> None:
        self.vocab = ByteVocab([None, *WORDS], (0,))
        self.top = [3, 2, 0]  # " fine", " secret", end of turn
        self.log_b = {3: -0.5, 2: -1.5, 0: -2.5}
        self.scored: list[list[int]] = []

    def prompt_ids(self, messages, prompt):
        return [1]

    def encode_answer(self, text):
        ids, spans, pos = [], [], 0
        for w in [" " + w for w in text.split(" ")[1:]]:
            ids.append(1 + WORDS.index(w.encode()) if w.encode() in WORDS else 1)  # other words: counted only
            spans.append((pos, pos + len(w)))
            pos += len(w)
        return ids, spans

    def delta_of(self, i: int) -> float:
        return -10.0 if i == 2 else 0.0

    def answer_scores(self, prompt_ids, ids, top_k):
        self.scored.append(list(ids))
        n = len(ids)
        d = np.array([self.delta_of(i) for i in ids])
        lb = np.array([self.log_b.get(i, -6.0) for i in ids])
        p = np.exp([self.log_b[i] for i in self.top])
        step = np.full(n, float(np.sum(p * np.array([self.delta_of(i) for i in self.top]))))
        top = np.tile(self.top[:top_k], (n, 1))
        return AnswerScores(
            lb,
            d,
            step,
            top,
            np.tile([self.log_b[i] for i in self.top[:top_k]], (n, 1)),
            np.tile([self.delta_of(i) for i in self.top[:top_k]], (n, 1)),
        )


async def _answer(model, params, stats=None):
    stats = stats if stats is not None else ChoiceStats()
    out = [p async for p in model.generate(Context(messages=MSG), params, stats=stats)]
    return "".join(p.text for p in out), out[-1].finish_reason


def test_sequence_mode_at_t0_unlearns_the_greedy_answer_in_scope():
    """T = 0: the remote's greedy answer holds " secret" (Δ = −10 ≤ −τ): more samples are drawn
    and the best one out of scope is returned; an answer out of scope costs one call."""
    remote = FakeRemote(story, can_continue=False, seed=2)
    model = ServedModel("m", remote, pair=WordPair(), mode="sequence", offset_threshold=1.0, offset_scope="token")
    stats = ChoiceStats()
    text, _ = asyncio.run(
        _answer(model, SamplingParams(max_tokens=8, temperature=0.0, offset_threshold=1.0, offset_scope="token"), stats)
    )
    assert "secret" not in text and stats.remote_calls == 4 and stats.offset_changed == 1
    assert stats.sample_texts[0] == " The secret is out"  # the greedy answer came first

    calm = FakeRemote(lambda prefix: (cand(" Paris", -0.1), END) if not prefix else (END,), can_continue=False)
    model = ServedModel("m", calm, pair=WordPair(), mode="sequence", offset_threshold=1.0, offset_scope="token")
    stats = ChoiceStats()
    assert asyncio.run(
        _answer(model, SamplingParams(max_tokens=8, temperature=0.0, offset_threshold=1.0, offset_scope="token"), stats)
    ) == (
        " Paris",
        "stop",
    )
    assert stats.remote_calls == 1 and stats.offset_changed == 0


def test_sequence_mode_scope_actions_when_every_sample_is_in_scope():
    """Every sample says the secret: "refuse" answers the refusal, "mask" the best sample with
    the secret masked; never the secret itself, at T = 0 or T = 1."""
    always = FakeRemote(
        lambda prefix: {b"": (cand(" The", 0.0),), b" The": (cand(" secret", 0.0),)}.get(prefix, (END,)),
        can_continue=False,
    )
    for temperature in (0.0, 1.0):
        params = SamplingParams(
            max_tokens=8, temperature=temperature, offset_threshold=1.0, offset_scope="token", seed=1
        )
        model = ServedModel("m", always, pair=WordPair(), mode="sequence", offset_threshold=1.0, refusal="No.")
        assert asyncio.run(_answer(model, params)) == ("No.", "stop")
        model = ServedModel("m", always, pair=WordPair(), mode="sequence", offset_threshold=1.0, scope_action="mask")
        assert asyncio.run(_answer(model, params)) == (" The [REDACTED]", "stop")
        # "rewrite": the text before " secret", then the pair under the offset (B's best, " fine", every time)
        model = ServedModel(
            "m", always, pair=WordPair(), mode="sequence", offset_threshold=1.0, scope_action="rewrite", top_k=3
        )
        greedy = replace(params, temperature=0.0, max_tokens=3)
        assert asyncio.run(_answer(model, greedy)) == (" The fine fine", "length")


def _remote_logprob(text: str) -> float:
    """The fake remote's log-probability of a whole answer (its end of turn included)."""
    total, prefix = 0.0, b""
    for word in [*(b" " + w.encode() for w in text.split(" ")[1:]), None]:
        cands = story(prefix)
        lp = np.array([c.logprob for c in cands])
        lp = lp - (lp.max() + np.log(np.exp(lp - lp.max()).sum()))
        total += float(
            next(v for c, v in zip(cands, lp, strict=True) if (c.is_eot if word is None else c.data == word))
        )
        prefix += word or b""
    return total


def test_sequence_mode_ranks_by_the_remote_sequence_logprob_where_it_gives_one():
    """Σℓ at T = 0 is the remote's own where it gives logprobs, B's teacher-forced otherwise:
    the answer is the out-of-scope sample that maximises it."""
    pair = WordPair()
    for logprobs in (True, False):
        remote = FakeRemote(story, can_continue=False, seed=4, logprobs=logprobs)
        model = ServedModel("m", remote, pair=pair, mode="sequence", offset_threshold=1.0, sequence_samples=8)
        stats = ChoiceStats()
        params = SamplingParams(max_tokens=8, temperature=0.0, offset_threshold=1.0, offset_scope="token")
        text, _ = asyncio.run(_answer(model, params, stats))
        out = sorted({t for t in stats.sample_texts if "secret" not in t})
        assert len(out) > 1, stats.sample_texts  # a choice to make

        def value(t: str, logprobs: bool = logprobs) -> float:
            if logprobs:
                return _remote_logprob(t)
            ids, _ = pair.encode_answer(t)
            return float(np.sum(pair.answer_scores([1], [*ids, 0], 0).log_b))

        assert text == max(out, key=value)


def test_guided_mode_replaces_the_in_scope_token_and_lets_the_remote_continue():
    """A remote that continues but gives no logprobs: its draft " The secret is out" is cut at
    " secret" (Δ = −10 ≤ −τ), B's best candidate under the offset (" fine") is taken, and the
    remote continues from " The fine"; out of scope its text passes unchanged (one call)."""
    remote = FakeRemote(story, logprobs=False)
    model = ServedModel(
        "m", remote, pair=WordPair(), mode="guided", offset_threshold=1.0, offset_scope="token", top_k=3
    )
    params = SamplingParams(max_tokens=10, temperature=0.0, offset_threshold=1.0, offset_scope="token")
    stats = ChoiceStats()
    assert asyncio.run(_answer(model, params, stats)) == (" The fine is out", "stop")
    assert stats.remote_calls == 2 and stats.offset_changed == 1
    assert remote.contexts[-1].assistant_prefix == b" The fine"  # the remote continued the pair's token

    calm = FakeRemote(lambda prefix: (cand(" Paris", -0.1), END) if not prefix else (END,), logprobs=False)
    model = ServedModel("m", calm, pair=WordPair(), mode="guided", offset_threshold=1.0, offset_scope="token", top_k=3)
    stats = ChoiceStats()
    assert asyncio.run(_answer(model, params, stats)) == (" Paris", "stop")
    assert stats.remote_calls == 1 and stats.offset_changed == 0


class RaisedPair(WordPair):
    """B prefers " secret" (Δ = −2) 3 nats before " fine", which U raises (Δ = +3)."""

    def __init__(self) -> None:
        super().__init__()
        self.top = [2, 3, 0]  # " secret", " fine", end of turn
        self.log_b = {2: -0.5, 3: -3.5, 0: -4.0}

    def delta_of(self, i: int) -> float:
        return {2: -2.0, 3: 3.0}.get(i, 0.0)


def test_guided_mode_under_the_choice_rule_takes_the_whole_offset_where_the_choice_is_lowered():
    """The remote's choice " secret" has Δ = −2 ≤ −τ. Under token it stays (its lead over
    " fine" exceeds its offset); under choice the whole offset applies at T = 0 and U's
    raised " fine" replaces it."""
    for scope, want in (("token", " The secret is out"), ("choice", " The fine is out")):
        model = ServedModel(
            "m",
            FakeRemote(story, logprobs=False),
            pair=RaisedPair(),
            mode="guided",
            offset_threshold=1.0,
            offset_scope=scope,
            top_k=3,
        )
        params = SamplingParams(max_tokens=10, temperature=0.0, offset_threshold=1.0, offset_scope=scope)
        assert asyncio.run(_answer(model, params))[0] == want, scope


def test_guided_mode_at_t1_never_keeps_a_deep_in_scope_token():
    """T = 1: a drafted token with Δ = −10 is accepted with probability about e^−10 / Z."""
    remote = FakeRemote(story, logprobs=False, seed=3)
    model = ServedModel(
        "m", remote, pair=WordPair(), mode="guided", offset_threshold=1.0, offset_scope="token", top_k=3
    )
    texts = [
        asyncio.run(
            _answer(
                model, SamplingParams(max_tokens=6, temperature=1.0, offset_threshold=1.0, offset_scope="token", seed=s)
            )
        )[0]
        for s in range(30)
    ]
    assert not any("secret" in t for t in texts), texts


def test_guided_mode_respects_max_tokens_and_refuses_logprobs_at_the_api():
    remote = FakeRemote(story, logprobs=False)
    model = ServedModel(
        "m", remote, pair=WordPair(), mode="guided", offset_threshold=1.0, offset_scope="token", top_k=3
    )
    text, finish = asyncio.run(
        _answer(model, SamplingParams(max_tokens=2, temperature=0.0, offset_threshold=1.0, offset_scope="token"))
    )
    assert (text, finish) == (" The fine", "length")
