"""What OpenAI-compatible servers send, read as :mod:`adapters.base` values: one logprob
entry as a :class:`~adapters.base.Candidate` (bytes recovered or marked unknowable,
logprobs clamped) and one position's top list ranked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .base import Candidate, Position, RemoteBadResponse
from .utf8 import REPLACEMENT_BYTES


def wire_logprob(logprob: Any) -> float:
    """A logprob as sent, in nats; missing, non-finite or clamped ones (servers send -9999.0
    for -inf, the vLLM convention) become ``-inf``."""
    value = -math.inf if logprob is None else float(logprob)
    return value if math.isfinite(value) and value > -9000.0 else -math.inf


def candidate_from_wire(
    token: str, logprob: float | None, data: list[int] | None, *, eot_tokens: frozenset[str]
) -> Candidate:
    """Build a :class:`Candidate` from an OpenAI-style logprob entry.

    Recovers bytes from ``token`` when the server sends none, and marks a
    candidate whose bytes are unknowable (U+FFFD standing for a partial UTF-8
    character, or an empty token string or empty bytes) with ``data=None``
    (``tests/test_cases.py``). Non-finite or missing logprobs become ``-inf``
    (the same file).
    """
    lp = wire_logprob(logprob)
    if token in eot_tokens:
        return Candidate(b"", lp, token, is_eot=True)
    raw = bytes(data) if data is not None else None
    if raw is not None and (REPLACEMENT_BYTES in raw or not raw):
        # the server's stand-in for (part of) a partial character: U+FFFD, or (vLLM's chat
        # logprobs) an empty token with empty bytes; no real token has no bytes
        raw = None
    elif raw is None:
        raw = None if (token == "" or "\ufffd" in token) else token.encode("utf-8")
    return Candidate(raw, lp, token)


def ranked_position(entries: Sequence[Candidate], sampled: Candidate, top_k: int) -> Position:
    """One :class:`Position`: the best ``top_k`` of ``entries`` (a server's ``top_logprobs``,
    in any order), best first, and the token the server sampled.

    Raises:
        RemoteBadResponse: no entries (the server gives no ``top_logprobs``).
    """
    ranked = sorted(entries, key=lambda c: c.logprob, reverse=True)[:top_k]
    if not ranked:
        raise RemoteBadResponse("upstream returned no top_logprobs; it cannot serve token mode")
    return Position(tuple(ranked), sampled)
