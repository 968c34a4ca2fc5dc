"""What decoding takes and gives: per-choice settings, the tokens and text it releases, and
the statistics of one choice. Plain data, no behaviour."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from proxy.common.literals import ScopeRule


class DecodingError(ValueError):
    """A request the decoder cannot serve (bad settings for this model)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-choice decoding settings, already validated by the protocol layer."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    alpha: float = 1.0
    offset_threshold: float | None = None
    """Scope threshold τ of :func:`proxy.decoding.offset.target_logits` (None: Δ at every step)."""
    offset_scope: ScopeRule = "step"
    """The rule by which τ leaves the offset out of scope (:mod:`proxy.decoding.offset`)."""


@dataclass(frozen=True, slots=True)
class TokenOut:
    """One generated token as the client sees it."""

    data: bytes
    token: str
    logprob: float
    top: tuple[tuple[str, bytes | None, float], ...]
    offset_changed: bool


@dataclass(slots=True)
class Piece:
    """Text released by one step (possibly empty) and the tokens it completes."""

    text: str
    tokens: list[TokenOut]
    finish_reason: str | None = None


@dataclass
class ChoiceStats:
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    remote_calls: int = 0
    offset_changed: int = 0
    max_abs_delta: float = 0.0
    draft_tokens: int = 0
    """Positions the remote drafted in calls of more than one token."""
    accepted_tokens: int = 0
    """Drafted tokens accepted as they were (speculative acceptance)."""
    pair_seconds: float = 0.0
    """Wall time of the pair's work for this choice (waiting for its thread included)."""
    sequence_weights: list[float] | None = None
    """Sequence mode: the resampling weight of each sample."""
    sample_texts: list[str] | None = None
    """Sequence mode: the samples the answer was drawn from."""
    dropped_candidates: int = 0
    """Remote candidates left out of S_t for unknown bytes, over all steps."""
    predicted_short: int = 0
    """Drafts shortened because the pair predicted a rejection at their first position."""
    refused: bool = False
    """The answer is the model's refusal text (sequence mode's scope action "refuse")."""
    scope_trace: list[float] | None = None
    """When a list: per step with offsets, the step's flip margin under the model's scope
    rule (:func:`proxy.decoding.offset.flip_margin`; :mod:`proxy.decoding.threshold`)."""


def display_token(data: bytes) -> str:
    """A token's text for ``logprobs``: its UTF-8 text, or OpenAI's
    ``bytes:\\xNN`` form when it is not valid UTF-8 on its own."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def finite(x: float) -> float:
    """JSON has no infinities: clamp as vLLM does (-9999.0)."""
    return x if math.isfinite(x) else -9999.0


@dataclass(frozen=True, slots=True)
class AnswerScores:
    """The pair's teacher-forced view of given answer tokens (``n`` local tokens after a
    prompt; :meth:`proxy.decoding.protocols.Pair.answer_scores`). Log-probabilities in nats."""

    log_b: np.ndarray
    """``[n]`` log B of each given token."""
    delta: np.ndarray
    """``[n]`` Δ = log U − log B of each given token."""
    step_offset: np.ndarray
    """``[n]`` s_t = Σ_x p_B(x)·Δ(x) over the whole vocabulary: the step rule's scope score
    with B standing in for the remote (:func:`proxy.decoding.offset.scope_score`)."""
    top_ids: np.ndarray
    """``[n, k]`` B's ``k`` most probable tokens at each position, best first (``k`` = 0: none asked)."""
    top_log_b: np.ndarray
    """``[n, k]`` their log B."""
    top_delta: np.ndarray
    """``[n, k]`` their Δ."""
