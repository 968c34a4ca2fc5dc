"""Drafts computed as the decoder reads them (:class:`SteppedDraft`): an in-process remote's
:class:`adapters.streams.DraftStream`.

An in-process remote (:mod:`adapters.llama_inprocess`) generates a draft one position at a
time on the same cores as the pair. Computed whole, every position past the first token the
decoder replaces is thrown away: in forget scope, with a scope threshold τ, about 4 of every
10 drafted positions (``bench/speed.py``'s embedded part). Stepped, the remote computes only
the positions the decoder asks for (:meth:`SteppedDraft.want`, the chunk the pair scores
next), and a draft closed at its first replaced token has cost nothing past it.

The positions are exactly those of a whole draft of the same call: the same context, the same
random generator drawing in the same order (``step`` keeps it between calls).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

from .base import Position, RemoteError


class SteppedDraft:
    """The positions of one draft, computed ``want`` at a time on ``executor``.

    ``step(count)`` computes up to ``count`` further positions (blocking; it holds the
    remote's context only while it computes) and returns them with whether the draft ended
    (its end of turn); ``n_tokens`` is the most positions the draft may hold and
    ``prompt_tokens`` the remote's count of the prompt's tokens.

    An error of the remote (:class:`adapters.base.RemoteError`) is raised by the first read
    only; later, it ends the draft at the positions computed (the next call meets it again
    and reports it, as :class:`adapters.streams.DraftStream` specifies).
    """

    def __init__(
        self,
        step: Callable[[int], tuple[list[Position], bool]],
        *,
        n_tokens: int,
        prompt_tokens: int,
        executor: Executor | None,
    ) -> None:
        self._step = step
        self._left = n_tokens
        self._prompt_tokens = prompt_tokens
        self._executor = executor
        self._buffer: deque[Position] = deque()
        self._want = 1
        self._ended = False
        self._read = 0

    def want(self, count: int) -> None:
        """Compute ``count`` positions (at least one) at the next read that finds none ready."""
        self._want = max(1, count)

    async def prompt_token_count(self) -> int | None:
        """The prompt's tokens, as the remote tokenized them."""
        return self._prompt_tokens

    def __aiter__(self) -> SteppedDraft:
        return self

    async def __anext__(self) -> Position:
        if not self._buffer:
            if self._ended or self._left <= 0:
                raise StopAsyncIteration
            count = min(self._want, self._left)
            try:
                positions, ended = await asyncio.get_running_loop().run_in_executor(self._executor, self._step, count)
            except RemoteError:
                if not self._read:
                    raise
                positions, ended = [], True
            self._left -= len(positions)
            self._ended = ended or not positions
            self._buffer.extend(positions)
            if not self._buffer:
                raise StopAsyncIteration
        self._read += 1
        return self._buffer.popleft()

    async def aclose(self, *, drain: float = 0.0) -> None:
        """No further positions are computed (nothing is held between reads)."""
        self._ended = True
        self._buffer.clear()
