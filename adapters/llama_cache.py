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
    """Positions before this were evaluated in one batch (the prompt); those from it on, one
    at a time (the answer)."""
    batch_logits: np.ndarray | None = None
    """log-softmax after position ``batch_end − 1``, kept from that batch (``[V]`` float64)."""

    def reusable(self, tokens: Sequence[int], prompt_len: int) -> int:
        """How many of ``tokens`` (a prompt of ``prompt_len`` tokens and the answer so far)
        the cache holds as llama.cpp's direct generation would have computed them: the prompt
        in one batch, every later token alone. That many are kept and the rest evaluated the
        same way (:meth:`adapters.llama_inprocess.LlamaInProcessAdapter._logprobs_after`), so
        that a position's logits depend on the tokens alone, not on what the cache held
        before (llama.cpp's quantised products give slightly different logits in another
        batch split, enough to flip near-ties).

        - Nothing unless the cache's batch is this very prompt.
        - Otherwise the tokens it shares with ``tokens``: also when it goes on past a token
          the decoder replaced (it holds the rest of the rejected draft) or past the tokens
          altogether (an earlier draft went further). Where it holds all of ``tokens``, the
          logits after them are :attr:`batch_logits` if they end where the prompt's batch
          ended, else the last token is evaluated alone again (the same logits as before).
        """
        n, want = len(self.tokens), len(tokens)
        if prompt_len < 1 or self.batch_end != prompt_len or min(n, want) < prompt_len:
            return 0
        common = min(n, want)
        differ = np.flatnonzero(self.tokens[:common] != np.asarray(tokens[:common], dtype=self.tokens.dtype))
        shared = int(differ[0]) if differ.size else common
        if shared < prompt_len:
            return 0
        if shared < want:
            return shared
        if want == self.batch_end and self.batch_logits is not None:
            return want
        return want - 1 if want - 1 >= prompt_len else 0


CLOSED = PromptCache()
"""The context's slot once it is freed."""
