"""The one seam between the decoder and a remote (black-box) model.

A remote adapter answers one question: *given a context (chat messages or a
raw prompt, plus the assistant bytes accepted so far), what are the remote's
top-k next-token candidates at the next position(s)?*  Everything the
decoder needs from a remote fits in :class:`Draft`; adapters never see torch
and the decoder never sees HTTP types.

Exception hierarchy (mapped to HTTP statuses once, in ``proxy.api.errors``)::

    RemoteError                  upstream could not give a usable answer
    ├── RemoteUnavailable        connect/read timeouts, 5xx, 429 after retries
    ├── RemoteBadResponse        the answer is malformed or unusable
    └── RemoteRejected           the upstream refused the request (4xx)
        └── ContextExhausted     the context window is full
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: bytes that servers such as vLLM and Ollama send for a token that holds only
#: part of a multi-byte UTF-8 character (``tests/test_cases.py``).
REPLACEMENT_BYTES = "\ufffd".encode()


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


@dataclass(frozen=True, slots=True)
class Position:
    """The remote's answer at one position: top-k candidates (best first)
    and the token the remote itself sampled there (which may be outside the
    top-k; the decoder does not add it to the support, see DESIGN.md)."""

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
    :func:`answer_token_bytes`). ``token_ids`` are the answer's remote token ids.
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
    max_top_logprobs: int = 20
    raw_prompt: bool = False
    """Whether it can serve a raw ``/v1/completions`` prompt."""
    token_ids: bool = False
    """Whether candidates carry the remote's token ids."""
    prompt_logprobs: bool = False
    """Whether it scores given text (:class:`TextScoringAdapter`, vLLM's ``prompt_logprobs``)."""
    top_k_drafts: bool = False
    """Whether its sampled drafts are drawn at T = 1 from its top-k candidates renormalised
    (a ``top_k`` sampling filter equal to ``top_logprobs``), not from its whole vocabulary.
    The decoder then takes p_t(x) = exp(ℓ(x)) / Σ_{top-k} exp(ℓ) as the draft law. Out of
    forget scope that is q_t itself, so every drafted token is accepted (DESIGN.md defines
    q_t over the top-k S_t: a token drawn from the tail would always be rejected)."""
    notes: tuple[str, ...] = field(default_factory=tuple)


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
    ) -> Sample:
        """One complete answer to ``ctx`` (no assistant prefix), sampled by the remote
        with these settings and no logprobs: what sequence mode draws its candidates from.

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


def answer_token_bytes(tokens: Sequence[str], text: bytes) -> list[bytes | None]:
    """The bytes of each remote token of ``text``, from the token strings a server
    printed (``decoded_token``) and the known text.

    A token string without U+FFFD is its own UTF-8. Tokens that hold part of a
    multi-byte character are printed as U+FFFD by vLLM (``tests/test_cases.py``):
    a run of them covers the bytes up to where the next clean token matches the
    text; a run of one token gets them all, a longer run cannot be split from the
    strings alone and its tokens get ``None``. A token that does not match the
    text (a server that normalises) ends the recovery: it and the rest get ``None``.
    """
    out: list[bytes | None] = []
    off = 0
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if "\ufffd" not in tok:
            data = tok.encode("utf-8")
            if not text.startswith(data, off):
                return out + [None] * (len(tokens) - i)
            out.append(data)
            off += len(data)
            i += 1
            continue
        j = i
        while j < len(tokens) and "\ufffd" in tokens[j]:
            j += 1
        if j < len(tokens):
            nxt = tokens[j].encode("utf-8")
            end = next(
                (e for e in range(off + 1, len(text) + 1) if text.startswith(nxt, e) and _complete(text[off:e])), None
            )
        else:
            end = len(text) if _complete(text[off:]) else None
        if end is None:
            return out + [None] * (len(tokens) - i)
        out.extend([text[off:end]] if j - i == 1 else [None] * (j - i))
        off = end
        i = j
    return out


def _complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(data)


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
    lp = -math.inf if logprob is None else float(logprob)
    if not math.isfinite(lp) or lp <= -9000.0:
        lp = -math.inf
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
