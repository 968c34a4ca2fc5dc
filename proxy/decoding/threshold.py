"""Calibrating the scope threshold τ (:mod:`proxy.decoding.offset`) on prompts that are
out of forget scope (a retain set's questions), instead of guessing it.

For greedy decoding the effect of τ on one prompt has a closed form. Decode
the prompt once with the offset computed but never applied (τ = ∞: the
remote's own greedy answer) and record, at every step t, the scope score s_t
and whether the offset (α·Δ, no threshold) would change the argmax there.
With threshold τ the answer stays the remote's exactly when no such *flip
step* is in scope, i.e. when τ > m for the prompt's margin

    m = max over flip steps of (−s_t)     (0 when no step would flip: kept at any τ),

because the answers agree token for token up to the first applied flip.
:func:`pick_threshold` then takes the smallest τ that keeps a target
fraction of the calibration prompts unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from adapters.base import Context
from proxy.decoding.served import ServedModel
from proxy.decoding.types import ChoiceStats, SamplingParams


async def scope_margin(model: ServedModel, messages: Sequence[dict[str, Any]], max_tokens: int = 40) -> float:
    """The margin m of one chat prompt (nats; see the module docstring).

    Raises:
        ValueError: the model has no offset.
        adapters.base.RemoteError: the remote failed.
    """
    if not model.uses_offset or model.alpha == 0:
        raise ValueError(f"model {model.name!r} has no offset to calibrate (or alpha is 0)")
    if model.mode != "token":
        raise ValueError(
            f"model {model.name!r} is served in sequence mode; the scope threshold is calibrated in token mode"
        )
    stats = ChoiceStats(scope_trace=[])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, alpha=model.alpha, offset_threshold=math.inf)
    async for _ in model.generate(Context(messages=tuple(messages)), params, stats=stats):
        pass
    assert stats.scope_trace is not None
    flips = [-s for s, flip in stats.scope_trace if flip]
    return max(flips, default=0.0)


def pick_threshold(margins: Sequence[float], unchanged: float) -> float:
    """The smallest τ (nats) with at least ``unchanged`` of the prompts'
    greedy answers kept: a prompt is kept when τ > its margin.

    Raises:
        ValueError: ``unchanged`` outside (0, 1], or no margins.
    """
    if not 0 < unchanged <= 1:
        raise ValueError("unchanged must be in (0, 1]")
    if not margins:
        raise ValueError("no prompts to calibrate on")
    m = np.sort(np.asarray(margins, dtype=np.float64))
    k = math.ceil(unchanged * len(m))  # prompts that must be kept: the k smallest margins
    return float(np.nextafter(max(m[k - 1], 0.0), np.inf))
