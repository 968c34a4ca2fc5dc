"""What the decoders need of the local pair (:class:`Pair`) and of the served model whose
settings they decode with (:class:`Served`), as Protocols: decoding stays free of torch, and
the decoders do not import the model that holds them. :class:`proxy.pair.local.LocalPair`
and :class:`proxy.decoding.served.ServedModel` are what serving passes; tests pass fakes.

Optional members, looked up with ``getattr`` where present: ``executor`` (a thread pool that
models sharing one pair share), ``tracked(fn, *args)`` (runs ``fn`` counted for the pair's
tree batcher) and ``batcher`` (``open_stream()``/``close_stream()`` around one choice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from adapters.base import RemoteAdapter
from proxy.common.literals import ScopeAction
from proxy.decoding.alignment import Aligner
from proxy.decoding.speculative import DraftCost
from proxy.decoding.types import AnswerScores, ChoiceStats
from proxy.decoding.vocab import ByteVocab

T = TypeVar("T")


class Pair(Protocol):
    """The local pair B and U = B + offset, seen from the decoder."""

    @property
    def has_offset(self) -> bool:
        """Whether U differs from B (without an offset Δ ≡ 0)."""
        ...

    def prompt_ids(self, messages: Sequence[dict[str, Any]] | None = None, prompt: str | None = None) -> list[int]:
        """Local token ids of a chat prompt (``messages``, the generation prompt added) or a raw
        ``prompt``.

        Raises:
            ValueError: the prompt is empty, too long, or the chat template fails.
        """
        ...

    def aligner(self, prompt_ids: Sequence[int], *, same_tokenizer: bool) -> Aligner:
        """Per-choice alignment state whose trunk starts with ``prompt_ids``."""
        ...

    def sequence_offset(self, prompt_ids: Sequence[int], text: str, end_of_turn: bool) -> tuple[float, int]:
        """ΣΔ (nats) of a whole answer ``text`` after ``prompt_ids``, teacher-forced, and the
        number of local tokens scored.

        Raises:
            ValueError: no prompt token to condition on, or the prompt alone fills the context.
        """
        ...


    @property
    def vocab(self) -> ByteVocab:
        """The local tokenizer's bytes per token and its end-of-turn ids."""
        ...

    def encode_answer(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Local token ids of answer text (special tokens' strings read as characters) and each
        token's character span ``[start, end)`` in ``text``."""
        ...

    def answer_scores(self, prompt_ids: Sequence[int], ids: Sequence[int], top_k: int) -> AnswerScores:
        """Teacher-forced log B, Δ and step scores of ``ids`` after ``prompt_ids``, with B's
        top-``top_k`` candidates at each position (:class:`proxy.decoding.types.AnswerScores`).

        Raises:
            ValueError: no prompt token, nothing to score, or longer than the pair's context.
        """
        ...


class Served(Protocol):
    """A served model's settings and its pair's threads, as the decoders read them
    (:class:`proxy.decoding.served.ServedModel`'s fields of the same names)."""

    name: str
    adapter: RemoteAdapter
    pair: Pair | None
    same_tokenizer: bool
    top_k: int
    speculative: bool
    max_draft_tokens: int
    acceptance_rate: float
    """The running per-token acceptance rate of the model's drafts; the token decoder updates it."""
    scope_acceptance_rate: float
    """The same where the offset's scope gate was open; the token decoder updates it."""
    draft_cost: DraftCost
    """The measured cost of a round against its draft's length; the token decoder updates it."""
    sequence_samples: int
    refusal: str
    scope_action: ScopeAction

    @property
    def uses_offset(self) -> bool:
        """Whether Δ can be non-zero."""
        ...

    async def run_pair(self, fn: Callable[..., T], *args: Any, stats: ChoiceStats | None = None) -> T:
        """``fn(*args)`` on one of the pair's threads."""
        ...
