"""The embedded remote's prompt caches (:class:`PromptCache`): the tokens whose KV a cache
holds, in the one llama.cpp context or saved as a sequence state
(:class:`adapters.llama_inprocess.LlamaInProcessAdapter`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class PromptCache:
    """One prompt cache: the tokens a KV cache holds, in the context (the slot
    :attr:`adapters.llama_inprocess.LlamaInProcessAdapter._live`) or saved in :attr:`state`."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.intc))
    """The token ids whose KV the cache holds, in order from position 0."""
    state: Any = None
    """The saved sequence state (a ctypes byte array) while another slot's cache is in the
    context; ``None`` while this one is (or holds nothing)."""
    busy: bool = False
    used: int = 0
    """When it was last released (a counter): least recently used wins ties."""
    batch_end: int = 0
    """Positions before this were evaluated in one multi-token batch (a prompt); those from
    it on, one at a time (drafted tokens)."""
    batch_logits: np.ndarray | None = None
    """log-softmax after position ``batch_end − 1``, kept from that batch (``[V]`` float64)."""

    def reusable(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` the cache already holds in a form that gives the same
        logits as before: that many are kept and the rest evaluated (all of them: the
        logits after them are :attr:`batch_logits`).

        - The whole cache, when it holds a prefix of ``tokens``.
        - When it holds all of ``tokens`` and more (an earlier draft of this answer went
          further, as at the end of the context): all of them when they end where the
          prompt's batch ended, else all but the last, provided that one was evaluated
          alone (evaluated alone again after the same cache, it gives the same logits).
        - When ``tokens`` leave the cache at their last token, after the prompt's batch (the
          decoder replaced a drafted token: the cache holds the prompt, the accepted tokens
          and the rest of the draft): the tokens before it, and the new one is evaluated
          alone, as a context that generated them one at a time would.
        - Nothing otherwise: a cache that shares only part of a prompt would have it
          evaluated in another batch split, and llama.cpp's quantised matmuls then give
          slightly different logits (enough to flip near-ties), so that a direct call
          would not be reproduced.
        """
        n, want = len(self.tokens), len(tokens)
        common = min(n, want)
        differ = np.flatnonzero(self.tokens[:common] != np.asarray(tokens[:common], dtype=self.tokens.dtype))
        if differ.size:
            kept = int(differ[0])
            return kept if kept == want - 1 and kept >= max(1, self.batch_end) else 0
        if n < want:
            return n
        if want == self.batch_end and self.batch_logits is not None:
            return want
        return want - 1 if want - 1 >= max(1, self.batch_end) else 0


CLOSED = PromptCache()
"""The context's slot once it is freed."""
