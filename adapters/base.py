"""The one seam between the decoder and a remote (black-box) model.

A remote adapter answers one question: *given a context (chat messages or a
raw prompt, plus the assistant bytes accepted so far), what are the remote's
top-k next-token candidates at the next position(s)?*  Everything the
decoder needs from a remote fits in :class:`Draft`; adapters never see torch
and the decoder never sees HTTP types.

Exception hierarchy (mapped to HTTP statuses once, in ``proxy.protocol.errors``)::

    RemoteError                  upstream could not give a usable answer
    ├── RemoteUnavailable        connect/read timeouts, 5xx, 429 after retries
    ├── RemoteBadResponse        the answer is malformed or unusable
    └── RemoteRejected           the upstream refused the request (4xx)
        └── ContextExhausted     the context window is full
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: End-of-turn / end-of-sequence token strings, best first: what servers print in
#: ``top_logprobs`` for the token that ends a turn (:mod:`adapters.http`'s default), and
#: the names looked up in a tokenizer's vocabulary for its end-of-turn ids
#: (:func:`adapters.hf_vocab.hf_eot_ids`; the order there is the order of ``eot_ids``).
EOT_TOKENS: tuple[str, ...] = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>", "<|end|>")


class RemoteError(Exception):
    """The remote could not give a usable answer."""

    kind = "upstream_error"


class RemoteUnavailable(RemoteError):
    """Timeouts, connection failures, 5xx or 429 that outlived the retries."""

    kind = "upstream_unavailable"

    def __init__(self, message: str, *, timeout: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.status = status


class RemoteBadResponse(RemoteError):
    """The remote answered, but not with something the proxy can use."""

    kind = "upstream_bad_response"


class RemoteRejected(RemoteError):
    """The remote refused the request with a 4xx that retrying cannot fix."""

    kind = "upstream_rejected"

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ContextExhausted(RemoteRejected):
    """The context window (the remote's or the local pair's) is full."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=400)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One entry of a remote's top-k list at one position.

    ``data`` is the candidate's exact bytes, or ``None`` when the server did
    not send them and they could not be recovered (a partial UTF-8 character
    reported as U+FFFD or as an empty string). ``logprob`` is the remote's
    natural-log probability (may be ``-inf``). ``is_eot`` marks the end-of-turn
    / end-of-sequence token; its ``data`` is ``b""``.
    """

    data: bytes | None
    logprob: float
    token: str
    token_id: int | None = None
    is_eot: bool = False

    @property
    def usable(self) -> bool:
        """Whether the decoder may put this candidate in its support S_t."""
        return (
            (self.data is not None or self.is_eot)
            and math.isfinite(self.logprob)
            and (
                self.logprob > -9000.0  # servers clamp -inf to -9999.0 (vLLM convention)
            )
        )


def same_token(a: Candidate, b: Candidate) -> bool:
    """Whether two entries of a remote's answer are the same remote token (the one rule:
    the decoder's drafted token in S_t, the scored answer's own token in its support).

    Where both carry a token id, the ids decide: one copy's bytes may have been recovered
    from the text (:func:`adapters.utf8.answer_token_bytes`) where the other's are unknown.
    Otherwise both must be end-of-turn or both not, with the same known bytes and the same
    token string (two end-of-turn tokens differ by their strings; unknown bytes match nothing).
    """
    if a.token_id is not None and b.token_id is not None:
        return a.token_id == b.token_id
    if a.is_eot or b.is_eot:  # end-of-turn entries carry no bytes: their strings decide
        return a.is_eot and b.is_eot and a.token == b.token
    return a.data is not None and a.data == b.data and a.token == b.token


def find_token(entry: Candidate, cands: Sequence[Candidate]) -> int | None:
    """The index of the first of ``cands`` that is ``entry``'s token (:func:`same_token`),
    ``None`` when none is."""
    return next((i for i, c in enumerate(cands) if same_token(c, entry)), None)


@dataclass(frozen=True, slots=True)
class Position:
    """The remote's answer at one position: top-k candidates (best first)
    and the token the remote itself sampled there (which may be outside the
    top-k; the decoder does not add it to the support, see docs/concepts.md)."""

    candidates: tuple[Candidate, ...]
    sampled: Candidate


@dataclass(frozen=True, slots=True)
class Sample:
    """One complete answer from a remote (sequence mode): its text and why it ended
    (``"stop"``: end of turn or a stop string; ``"length"``: ``max_tokens``)."""

    text: str
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprob: float | None = None
    """The remote's log-probability of ``text`` (Σ of its tokens' logprobs, nats), where
    asked for and given."""


@dataclass(frozen=True, slots=True)
class Draft:
    """One remote call's worth of positions (1 for token-by-token decoding).

    ``prompt_tokens`` is the remote's own count of prompt tokens, when it
    reports usage.
    """

    positions: tuple[Position, ...]
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    calls: int = 1
    """Remote calls it took (2 when a healed one-token step fell back to the whole text)."""


@dataclass(frozen=True, slots=True)
class ScoredText:
    """The remote's teacher-forced logprobs of given answer text (vLLM's ``prompt_logprobs``).

    One :class:`Position` per remote token of the answer: ``candidates`` are the
    remote's top-k at that position (best first, with ``token_id``), ``sampled``
    is the answer's own token there, with its logprob (nats, over the remote's
    whole vocabulary) and, where they can be known, its bytes (``data``; see
    :func:`adapters.utf8.answer_token_bytes`). ``token_ids`` are the answer's remote token ids.
    """

    token_ids: tuple[int, ...]
    positions: tuple[Position, ...]
    prompt_ids: tuple[int, ...] = ()
    """The remote's token ids of the prompt before the answer."""


@dataclass(frozen=True, slots=True)
class Context:
    """What the remote is conditioned on.

    Exactly one of ``messages`` (OpenAI chat messages, as plain dicts) and
    ``prompt`` (a raw completion prompt) is set. ``assistant_prefix`` holds
    the bytes the proxy has accepted so far (they may end inside a UTF-8
    character). ``token_ids`` are the remote's own token ids for that prefix
    when every accepted token came from this adapter with an id, which lets
    in-process adapters continue without re-tokenising.
    """

    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    assistant_prefix: bytes = b""
    token_ids: tuple[int, ...] | None = None
    last_token: bytes = b""
    """Bytes of the last accepted remote token (a suffix of ``assistant_prefix``):
    text-continuing adapters use it to heal the token boundary."""

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("Context needs exactly one of messages and prompt")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a remote can do; the decoder picks its strategy from these."""

    can_continue: bool
    """Whether it continues a partial assistant message (token mode needs it)."""
    token_ids: bool = False
    """Whether candidates carry the remote's token ids."""
    prompt_logprobs: bool = False
    """Whether it scores given text (:class:`TextScoringAdapter`, vLLM's ``prompt_logprobs``)."""
    logprobs: bool = True
    """Whether it gives top-k logprobs (token mode needs them; without them a remote that
    continues is served in guided mode, one that cannot in sequence mode)."""
    max_top_logprobs: int = 20
    """The most candidates per position it gives (its ``top_logprobs`` limit)."""
    top_k_drafts: bool = False
    """Whether its sampled drafts are drawn at T = 1 from its top-k candidates renormalised
    (a ``top_k`` sampling filter equal to ``top_logprobs``), not from its whole vocabulary.
    The decoder then takes p_t(x) = exp(ℓ(x)) / Σ_{top-k} exp(ℓ) as the draft law. Out of
    forget scope that is q_t itself, so every drafted token is accepted (docs/concepts.md defines
    q_t over the top-k S_t: a token drawn from the tail would always be rejected)."""
    streams_drafts: bool = False
    """Whether it streams a draft's positions as it generates them
    (:class:`adapters.streams.DraftStreamingAdapter`): the pair scores the first ones while the remote writes
    the rest, and the decoder ends the request at the first token it replaces."""
    drafts_on_demand: bool = False
    """Whether a streamed draft's positions are computed only as the decoder reads them (an
    in-process remote, :class:`adapters.stepped_draft.SteppedDraft`): a long draft cut at its
    first replaced token costs nothing past it, so the decoder asks for the longest."""


def position_from_logprobs(
    lp: np.ndarray, *, top_k: int, candidate: Callable[[int, float], Candidate], rng: np.random.Generator, sample: bool
) -> Position:
    """One :class:`Position` from a full-vocabulary log-softmax ``lp`` (``[V]``, nats), for
    in-process remotes: the top-k candidates (best first, ties in id order) and the sampled
    token, the argmax when ``sample`` is false (single-token calls), else drawn at T = 1
    from the top-k candidates renormalised (drafts; :attr:`Capabilities.top_k_drafts`).
    ``candidate(token_id, logprob)`` builds one entry."""
    k = min(top_k, lp.size)
    top = np.argpartition(-lp, k - 1)[:k]
    top = top[np.argsort(-lp[top], kind="stable")]
    cands = tuple(candidate(int(t), float(lp[t])) for t in top)
    if sample:
        w = np.exp(lp[top] - lp[top[0]])
        pick = int(top[rng.choice(k, p=w / w.sum())])
    else:
        pick = int(top[0])
    return Position(cands, candidate(pick, float(lp[pick])))


def drafted(positions: list[Position], tokens: list[int], pos: Position) -> bool:
    """An in-process draft's step: ``pos`` added to ``positions`` and its sampled token to
    ``tokens`` (the next step's context); True where it ends the draft (end of turn)."""
    positions.append(pos)
    if pos.sampled.is_eot:
        return True
    assert pos.sampled.token_id is not None
    tokens.append(pos.sampled.token_id)
    return False


@runtime_checkable
class RemoteAdapter(Protocol):
    """One method: the remote's top-k candidates for the next position(s)."""

    name: str
    capabilities: Capabilities

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        """Top-k candidates for up to ``n_tokens`` positions after ``ctx``.

        With ``n_tokens == 1`` only the candidate list matters. For longer
        drafts the remote samples at temperature 1 with every other filter off,
        so that the reported logprobs give the distribution it sampled from
        (speculative acceptance needs p_t(x) of each drafted token x): its whole
        vocabulary, or its top ``top_k`` renormalised where
        :attr:`Capabilities.top_k_drafts` says so. With ``greedy`` it takes the
        argmax at every position. ``seed`` makes the
        remote's sampling repeatable where it supports that.

        Raises:
            RemoteUnavailable: after bounded retries.
            RemoteBadResponse: malformed or unusable logprobs.
            RemoteRejected: a 4xx the remote will not change its mind about.
        """
        ...

    async def check(self) -> None:
        """Readiness: return when the remote can serve (in-process: at once).

        Raises:
            RemoteUnavailable, RemoteRejected: the upstream does not answer, or refuses.
        """
        ...

    async def aclose(self) -> None:
        """Release connections, threads or models."""
        ...


@runtime_checkable
class SamplingAdapter(Protocol):
    """A remote that also gives complete answers (the HTTP adapters): sequence mode's seam.
    In-process remotes do not need it: they continue partial answers and give logprobs."""

    async def sample(
        self,
        ctx: Context,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        logprobs: bool = False,
    ) -> Sample:
        """One complete answer to ``ctx``, sampled by the remote with these settings: what
        sequence mode draws its candidates from, and guided mode's drafts (a context with an
        assistant prefix is continued from it, where :attr:`Capabilities.can_continue`).
        ``logprobs``: :attr:`Sample.logprob` is the answer's log-probability (a remote with
        :attr:`Capabilities.logprobs`).

        Raises:
            RemoteUnavailable, RemoteBadResponse, RemoteRejected: as :meth:`RemoteAdapter.draft`.
        """
        ...


@runtime_checkable
class TextScoringAdapter(Protocol):
    """A remote that scores given text (vLLM's ``prompt_logprobs``): the audit's probability
    metrics and ``deltaproxy train --mode remote`` need it."""

    async def score_text(self, ctx: Context, text: str, *, top_k: int) -> ScoredText:
        """The remote's logprobs of ``text`` as the answer to ``ctx`` (no assistant prefix),
        teacher-forced: top-``top_k`` candidates and the answer's own token at each position.

        Raises:
            RemoteUnavailable, RemoteRejected: as :meth:`RemoteAdapter.draft`
                (:class:`ContextExhausted` when the prompt plus ``text`` does not fit).
            RemoteBadResponse: the answer's tokens cannot be told apart from the prompt's.
        """
        ...


def _unfinished_char(tail: bytes) -> bool:
    """Whether ``tail`` is the start of a UTF-8 character that needs more bytes."""
    if not tail:
        return True
    lead = tail[0]
    need = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    return len(tail) < need and all(0x80 <= b <= 0xBF for b in tail[1:])


def split_incomplete_utf8(data: bytes) -> tuple[str, bytes]:
    """Split ``data`` into its longest valid UTF-8 text prefix and the
    trailing bytes of an unfinished character (at most 3 bytes).

    Raises:
        UnicodeDecodeError: if the invalid bytes are not just an unfinished tail.
    """
    for cut in range(0, min(3, len(data)) + 1):
        head, tail = data[: len(data) - cut], data[len(data) - cut :]
        if not _unfinished_char(tail):
            continue
        try:
            return head.decode("utf-8"), tail
        except UnicodeDecodeError:
            continue
    data.decode("utf-8")  # raises the real error for the whole buffer
    raise AssertionError("unreachable")
