"""A round's drafted positions (:class:`Drafted`): a whole draft, or one the remote streams
(:class:`adapters.base.DraftStream`), read in chunks by token mode as the pair scores them:
a chunk is scored as soon as its positions have arrived, while the remote writes the next.

Either way a draft holds at most the ``n`` positions asked for and ends after the first
drafted token the decoder cannot continue from: the end of turn, bytes unknown, or a token
that ends inside a UTF-8 character (token mode heals the next position; a new call does the
same). A streamed draft is closed as soon as the decoder needs no more of it (its first
replaced token, the answer's end): the remote stops generating the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapters.base import DraftStream, Position
from proxy.decoding.text import inside_character


class Drafted:
    """The positions of one round: ``positions`` (a whole draft, with its usage's
    ``prompt_tokens``) or ``stream``; ``prefix`` is the accepted text the draft continues and
    ``n`` the positions asked for."""

    def __init__(
        self,
        prefix: bytes,
        n: int,
        positions: Sequence[Position] = (),
        stream: DraftStream | None = None,
        prompt_tokens: int | None = None,
    ) -> None:
        self.n = n
        self._text = prefix
        self._positions: list[Position] = []
        self._stream = stream
        self._prompt_tokens = prompt_tokens  # a whole draft's usage count
        self._ended = stream is None
        self.closed = False
        for pos in positions:
            if not self._add(pos):
                break

    @property
    def streamed(self) -> bool:
        """Whether the remote streams this draft."""
        return self._stream is not None

    @property
    def streaming(self) -> bool:
        """Whether more positions may still come from the remote."""
        return not self._ended

    @property
    def received(self) -> int:
        """Positions received (and kept) so far."""
        return len(self._positions)

    def _add(self, pos: Position) -> bool:
        """Keep ``pos``; False where the draft ends with it."""
        self._positions.append(pos)
        if len(self._positions) >= self.n or pos.sampled.is_eot or pos.sampled.data is None:
            return False
        self._text += pos.sampled.data
        return not inside_character(self._text)

    async def get(self, start: int, count: int) -> list[Position]:
        """Positions ``start`` to ``start + count`` (fewer at the draft's end), waiting for a
        streamed draft's to arrive.

        Raises:
            adapters.base.RemoteUnavailable, adapters.base.RemoteBadResponse: a streamed
                draft that failed before its first position.
        """
        while not self._ended and len(self._positions) < start + count:
            assert self._stream is not None
            try:
                pos = await anext(self._stream)
            except StopAsyncIteration:
                self._ended = True
                break
            if not self._add(pos):
                self._ended = True
        return self._positions[start : start + count]

    async def prompt_token_count(self) -> int | None:
        """The remote's count of the prompt's tokens: the whole draft's usage, or the stream's
        (:meth:`adapters.base.DraftStream.prompt_token_count`, once it is closed)."""
        if self._stream is not None:
            return await self._stream.prompt_token_count()
        return self._prompt_tokens

    async def close(self) -> None:
        """End a streamed draft's request (nothing for a whole draft)."""
        self._ended = self.closed = True
        if self._stream is not None:
            await self._stream.aclose()
