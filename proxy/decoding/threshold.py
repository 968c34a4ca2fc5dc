"""Calibrating the scope threshold τ (:mod:`proxy.decoding.offset`) on prompts that are
out of forget scope (a retain set's questions), instead of guessing it.

For greedy decoding the effect of τ on one prompt has a closed form. Decode
the prompt once with the offset computed but never applied (τ = ∞: the
remote's own greedy answer) and record, at every step t, the step's flip margin
m_t (:func:`proxy.decoding.offset.flip_margin`): the largest τ at which the offset,
under the model's scope rule, would change the argmax there (0 when none would).
With threshold τ the answer stays the remote's whenever τ > m for the prompt's margin

    m = max over steps of m_t     (0 when no step would flip: kept at any τ),

because the answers then agree token for token (for the ``step`` rule, exactly when;
for ``token`` and ``choice``, a τ below m may still keep the answer, so the fraction kept
is at least the one computed).
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
from proxy.decoding.types import ChoiceStats


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
    params = model.sampling_params(max_tokens, never_apply=True)
    async for _ in model.generate(Context(messages=tuple(messages)), params, stats=stats):
        pass
    assert stats.scope_trace is not None
    return max(stats.scope_trace, default=0.0)


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
