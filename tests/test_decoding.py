"""The decoding loop on a fake remote: exactness, seeds, stop strings, max_tokens."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fakes import EOT, FakeRemote, normalised, script
from scipy.stats import chisquare

from adapters.base import Context
from proxy.decoding import DecodingError, SamplingParams, ServedModel, TextReleaser, TokenOut

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

            def commit(self, data):
                pass

        return A()


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

    n = 20_000
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
