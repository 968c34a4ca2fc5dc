"""A served model name: its remote, its local pair, α and how it decodes.

:class:`ServedModel` holds the settings and the pair's threads; the decoding itself is
:class:`proxy.decoding.token_mode.TokenDecoder` (token by token, speculative or not) or
:class:`proxy.decoding.sequence_mode.SequenceDecoder` (whole samples resampled). No HTTP or
torch types here: the pair runs on its worker threads behind :meth:`ServedModel.run_pair`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from adapters.base import Context, RemoteAdapter, SamplingAdapter
from proxy.common.literals import ClientAlpha, DecodingMode, ScopeAction, ScopeRule
from proxy.decoding.guided_mode import GuidedDecoder
from proxy.decoding.protocols import Pair
from proxy.decoding.sequence_mode import SequenceDecoder
from proxy.decoding.speculative import DraftCost
from proxy.decoding.token_mode import TokenDecoder
from proxy.decoding.types import ChoiceStats, DecodingError, Piece, SamplingParams

T = TypeVar("T")


@dataclass
class ServedModel:
    """A served model name: a remote, an optional local pair, and α.

    ``pair`` is what decoding needs of the local pair (:class:`proxy.decoding.protocols.Pair`;
    :class:`proxy.pair.local.LocalPair` in serving); ``None`` or a pair without offset means
    Δ ≡ 0. ``mode`` picks the decoder: :class:`proxy.decoding.token_mode.TokenDecoder` or
    :class:`proxy.decoding.sequence_mode.SequenceDecoder`.

    ``speculative`` switches on speculative acceptance: the remote drafts up
    to ``max_draft_tokens`` tokens per call (:class:`DraftLength`), each
    accepted or replaced by :func:`speculative_pick`; the output has the same
    distribution as token-by-token decoding (one remote call per token).
    """

    name: str
    adapter: RemoteAdapter
    pair: Pair | None = None
    alpha: float = 1.0
    client_alpha: ClientAlpha = "at_least"
    """What a request's ``offset_alpha`` may do (:attr:`proxy.config.ModelConfig.client_alpha`)."""
    offset_threshold: float | None = None
    offset_scope: ScopeRule = "step"
    """The rule by which ``offset_threshold`` leaves the offset out of scope (:mod:`proxy.decoding.offset`)."""
    top_k: int = 20
    same_tokenizer: bool = False
    offset_sha256: str | None = None
    speculative: bool = True
    max_draft_tokens: int = 128
    mode: DecodingMode = "token"
    """``"token"``: offset decoding token by token (speculative or not); ``"guided"``: the
    remote's drafts, B standing in for its logprobs in scope (:mod:`proxy.decoding.guided_mode`);
    ``"sequence"``: complete samples re-ranked by their offset (:mod:`proxy.decoding.sequence_mode`)."""
    sequence_samples: int = 4
    refusal: str = "I can't help with that."
    """Sequence mode's answer when every sample is in forget scope and ``scope_action`` is "refuse"."""
    scope_action: ScopeAction = "refuse"
    """Sequence mode, every sample in forget scope: answer ``refusal`` or the best sample masked."""
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="pair"))
    _token: TokenDecoder = field(init=False, repr=False)
    _sequence: SequenceDecoder = field(init=False, repr=False)
    _guided: GuidedDecoder = field(init=False, repr=False)
    acceptance_rate: float = 1.0
    """Running per-token acceptance rate of this model's drafts (seeds each request's :class:`DraftLength`)."""
    scope_acceptance_rate: float = 0.9
    """Running per-token acceptance rate of this model's drafted tokens where the offset's scope
    gate was open (in forget scope): where the gate opens at a draft's first position, the
    draft is sized for this rate at most (:meth:`TokenDecoder._predicted_length`). 0.9 before
    one is measured (the demo offset's is 0.93 on its forget questions)."""
    draft_cost: DraftCost = field(default_factory=DraftCost)
    """What a round of speculative decoding costs this model as a function of its draft's
    length (sizes unseeded requests' drafts, :meth:`DraftLength.best_length`)."""

    def __post_init__(self) -> None:
        shared = getattr(self.pair, "executor", None)
        if shared is not None and self._pool is not shared:
            # Models that share a pair (one copy of the weights) share its threads, so that their
            # tree passes are batched together and its forward passes serialised (B is U with its
            # adapter layers switched off). (A copy made with dataclasses.replace comes with the
            # shared pool already: not shut down.)
            self._pool.shutdown(wait=False)
            self._pool = shared
        caps = self.adapter.capabilities
        if self.mode not in ("token", "guided", "sequence"):
            raise DecodingError(f"model {self.name!r}: unknown decoding mode {self.mode!r}")
        if self.mode in ("sequence", "guided") and not isinstance(self.adapter, SamplingAdapter):
            raise DecodingError(f"model {self.name!r}: the remote gives no complete answers for {self.mode} mode")
        if self.mode in ("token", "guided") and not caps.can_continue:
            raise DecodingError(
                f"model {self.name!r}: the remote cannot continue a partial assistant message, which {self.mode} "
                'mode needs; serve it with decoding = "sequence"'
            )
        if self.mode == "token" and not caps.logprobs:
            raise DecodingError(
                f"model {self.name!r}: the remote gives no logprobs, which token mode needs; serve it with "
                'decoding = "guided" (it continues partial answers) or "sequence"'
            )
        self._token = TokenDecoder(self)
        self._sequence = SequenceDecoder(self)
        self._guided = GuidedDecoder(self)

    @property
    def uses_offset(self) -> bool:
        """Whether Δ can be non-zero: a pair with an offset."""
        return self.pair is not None and self.pair.has_offset

    def sampling_params(
        self, max_tokens: int, *, temperature: float = 0.0, seed: int | None = None, never_apply: bool = False
    ) -> SamplingParams:
        """Settings for one answer at this model's own α, scope threshold τ and rule (greedy
        by default); ``never_apply``: τ = ∞, the offset computed at every step and never
        applied (the remote's own answer, for calibration)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            alpha=self.alpha,
            offset_threshold=math.inf if never_apply else self.offset_threshold,
            offset_scope=self.offset_scope,
        )

    async def probe(self) -> None:
        """One cheap call (one token) that asks the remote for what this model's strategy needs:
        its top-k logprobs after a partial answer (token mode), a continued partial answer
        (guided mode), or a complete answer with its logprobs where the remote is said to give
        them (sequence mode). A model that refuses logprobs or prefill is then caught at start-up.

        Raises:
            adapters.base.RemoteRejected: the upstream refused the probe (4xx).
            adapters.base.RemoteUnavailable: it did not answer.
        """
        ask = Context(messages=({"role": "user", "content": "Say OK."},))
        partial = Context(messages=ask.messages, assistant_prefix=b"O")
        if self.mode == "token":
            await self.adapter.draft(partial, n_tokens=1, top_k=self.top_k)
            return
        assert isinstance(self.adapter, SamplingAdapter)
        if self.mode == "guided":
            await self.adapter.sample(partial, max_tokens=1, temperature=0.0, top_p=1.0)
        else:
            await self.adapter.sample(
                ask, max_tokens=1, temperature=0.0, top_p=1.0, logprobs=self.adapter.capabilities.logprobs
            )

    async def aclose(self) -> None:
        """Close the remote's connections and stop the pair's threads (pending pair work is cancelled)."""
        await self.adapter.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_pair(self, fn: Callable[..., T], *args: Any, stats: ChoiceStats | None = None) -> T:
        """``fn(*args)`` on one of the pair's threads; its wall time (queueing included) is added to
        ``stats.pair_seconds``."""
        t0 = time.perf_counter()
        tracked = getattr(self.pair, "tracked", None)  # counted for the pair's tree batcher
        try:
            if tracked is not None:
                return await asyncio.get_running_loop().run_in_executor(self._pool, tracked, fn, *args)
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            if stats is not None:
                stats.pair_seconds += time.perf_counter() - t0

    async def generate(
        self, base: Context, params: SamplingParams, *, index: int = 0, stats: ChoiceStats | None = None
    ) -> AsyncIterator[Piece]:
        """Decode one choice (the ``index``-th of the request; with ``params.seed`` its random
        stream is (seed, index)); yields :class:`Piece` objects, the last with a finish reason.

        Raises:
            adapters.base.RemoteError: the remote failed after retries.
            DecodingError: the pair cannot take this prompt.
        """
        stats = stats if stats is not None else ChoiceStats()
        rng = np.random.default_rng(None if params.seed is None else [params.seed % 2**64, index])
        if self.mode == "sequence":
            yield await self._sequence.generate(base, params, rng, stats)
            return
        # aclosing: a consumer that stops early (a client gone) closes the decoder at once, and with
        # it a streamed draft's request, not when the generator is collected.
        if self.mode == "guided":
            async with contextlib.aclosing(self._guided.generate(base, params, rng, stats)) as pieces:
                async for piece in pieces:
                    yield piece
            return
        async with contextlib.aclosing(self._token.generate(base, params, rng, stats)) as pieces:
            async for piece in pieces:
                yield piece
