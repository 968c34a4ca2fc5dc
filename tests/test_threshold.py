"""Calibrating the scope threshold (proxy.decoding.threshold): the closed form "a greedy
answer is unchanged exactly when τ exceeds the prompt's margin" holds against
real decoding with a real (tiny, random) pair."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import make_tiny_pair
from fakes import EOT, FakeRemote, normalised

from adapters.base import Context
from proxy.decoding.served import ServedModel
from proxy.decoding.threshold import pick_threshold, scope_margin
from proxy.decoding.types import SamplingParams

WORDS = [" cat", " dog", " sun", " tea", " map", " red"]


def _steps(prefix: bytes):
    """Near-tied candidates that depend on the text so far; the answer ends after 8 words."""
    if prefix.count(b" ") >= 8:
        return (EOT,)
    seed = int.from_bytes(hashlib.sha256(prefix).digest()[:4], "little")
    scores = np.random.default_rng(seed).normal(0, 0.6, len(WORDS))
    return normalised(list(zip(WORDS, scores, strict=True)))


async def _answer(model: ServedModel, content: str, threshold: float | None, alpha: float) -> str:
    params = SamplingParams(
        max_tokens=20, temperature=0.0, alpha=alpha, offset_threshold=threshold, offset_scope=model.offset_scope
    )
    ctx = Context(messages=({"role": "user", "content": content},))
    return "".join([p.text async for p in model.generate(ctx, params)])


@pytest.mark.parametrize("scope", ["step", "token", "choice"])
async def test_an_answer_is_unchanged_when_tau_exceeds_its_margin(tiny_base, smollm2_tokenizer, scope):
    """Under the step rule, exactly when; under the token and choice rules, whenever τ > m, and never at
    τ just below m (the step with the largest margin flips there, or an earlier one did)."""
    pair = make_tiny_pair(tiny_base, smollm2_tokenizer)
    model = ServedModel("m", FakeRemote(_steps), pair=pair, alpha=1.0, offset_scope=scope)
    prompts = [f"Tell me about topic {i}." for i in range(8)]
    margins = [await scope_margin(model, [{"role": "user", "content": p}], max_tokens=20) for p in prompts]
    assert any(m > 0 for m in margins) and len(set(margins)) > 2  # the offset flips some steps, not all alike
    for p, m in zip(prompts, margins, strict=True):
        remote = await _answer(model, p, None, 0.0)
        for tau in {0.0, max(m - 1e-3, 0.0), m + 1e-3, m + 5.0}:
            kept = await _answer(model, p, tau, 1.0) == remote
            if scope == "step" or tau > m or tau == max(m - 1e-3, 0.0):
                assert kept == (tau > m or m == 0.0), (p, m, tau)


def test_pick_threshold_keeps_the_asked_fraction():
    margins = [0.0, 0.5, 1.0, 2.0, 4.0]
    tau = pick_threshold(margins, 0.8)
    assert 2.0 < tau < 2.0001
    assert np.mean([tau > m for m in margins]) >= 0.8
    assert pick_threshold(margins, 0.2) > 0.0  # a margin of 0 (no flip) is kept by any τ > 0
    with pytest.raises(ValueError):
        pick_threshold(margins, 0.0)
    with pytest.raises(ValueError):
        pick_threshold([], 0.9)


async def test_a_model_without_offset_cannot_be_calibrated():
    with pytest.raises(ValueError, match="no offset"):
        await scope_margin(ServedModel("m", FakeRemote(_steps)), [{"role": "user", "content": "x"}])
