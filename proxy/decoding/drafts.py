"""A round's drafted positions (:class:`Drafted`): a whole draft, or one the remote streams
(:class:`adapters.streams.DraftStream`), read in chunks by token mode as the pair scores them:
a chunk is scored as soon as its positions have arrived, while the remote writes the next.

Either way a draft holds at most the ``n`` positions asked for and ends after the first
drafted token the decoder cannot continue from: the end of turn, bytes unknown, or a token
that ends inside a UTF-8 character (token mode heals the next position; a new call does the
same). A streamed draft is closed as soon as the decoder needs no more of it (its first
replaced token, the answer's end): the remote stops generating the rest.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from adapters.base import Context, Position, RemoteBadResponse, RemoteUnavailable
from adapters.streams import DraftStream, DraftStreamingAdapter
from proxy.decoding.protocols import Served
from proxy.decoding.text import inside_character
from proxy.decoding.types import ChoiceStats

log = logging.getLogger(__name__)


#: How long a stream read to its last position may take to end by itself when closed: its
#: usage chunk follows at once (vLLM), and without it the server is asked to count the prompt.
DRAIN_SECONDS = 1.0


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
        self._complete = stream is None
        """Read to its end: ``n`` positions, the end of turn, or the stream's own end."""
        self.closed = False
        self.accounted = False
        """Its round's drafted tokens and usage have been counted (token mode, once per round)."""
        for pos in positions:
            if not self._add(pos):
                break

    @property
    def streamed(self) -> bool:
        """Whether the remote streams this draft."""
        return self._stream is not None

    @property
    def received(self) -> int:
        """Positions received (and kept) so far."""
        return len(self._positions)

    def _add(self, pos: Position) -> bool:
        """Keep ``pos``; False where the draft ends with it."""
        self._positions.append(pos)
        if len(self._positions) >= self.n or pos.sampled.is_eot:
            self._complete = True
            return False
        if pos.sampled.data is None:
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
        if not self._ended and len(self._positions) < start + count:
            assert self._stream is not None
            self._stream.want(start + count - len(self._positions))
        while not self._ended and len(self._positions) < start + count:
            assert self._stream is not None
            try:
                pos = await anext(self._stream)
            except StopAsyncIteration:
                self._ended = self._complete = True
                break
            if not self._add(pos):
                self._ended = True
        return self._positions[start : start + count]

    async def end_round(self, stats: ChoiceStats, count: bool) -> None:
        """Close the draft and count its drafted tokens and, with ``count`` (a request's first
        round, not on an error), the remote's prompt tokens where unknown: a streamed draft
        may ask the server (one request). Once; later calls do nothing."""
        if self.accounted:
            return
        self.accounted = True
        await self.close()
        if self.n > 1:
            stats.draft_tokens += self.received
        if count and stats.prompt_tokens is None:
            stats.prompt_tokens = await self.prompt_token_count()

    async def prompt_token_count(self) -> int | None:
        """The remote's count of the prompt's tokens: the whole draft's usage, or the stream's
        (:meth:`adapters.streams.DraftStream.prompt_token_count`, once it is closed)."""
        if self._stream is not None:
            return await self._stream.prompt_token_count()
        return self._prompt_tokens

    async def close(self) -> None:
        """End a streamed draft's request (nothing for a whole draft); one read to its end
        may end by itself first, for at most :data:`DRAIN_SECONDS` (its usage chunk). Again: nothing."""
        if self.closed:
            return
        self._ended = self.closed = True
        if self._stream is not None:
            await self._stream.aclose(drain=DRAIN_SECONDS if self._complete else 0.0)


async def open_draft(
    model: Served, ctx: Context, n: int, *, greedy: bool, seed: int | None, stats: ChoiceStats
) -> Drafted:
    """One remote call of ``model`` for up to ``n`` positions after ``ctx``: streamed where the
    remote streams drafts (its first position read here), else whole.

    Raises:
        adapters.base.ContextExhausted: the remote's context is full.
        adapters.base.RemoteBadResponse: no position.
        adapters.base.RemoteError: the call failed (after retries).
    """
    adapter = model.adapter
    if adapter.capabilities.streams_drafts and isinstance(adapter, DraftStreamingAdapter):
        stream = await adapter.stream_draft(ctx, n_tokens=n, top_k=model.top_k, seed=seed, greedy=greedy)
        if stream is not None:
            stats.remote_calls += 1
            # An error before the first position is the call's, as a whole draft's would be; a
            # stream that broke off before it is asked again whole (with that call's retries).
            # A server that answers a stream request without logprobs in its chunks (or not as a
            # stream at all) is asked whole, and from then on only whole if that works.
            drafted = Drafted(ctx.assistant_prefix, n, stream=stream)
            unstreamable = False
            try:
                if await drafted.get(0, 1):
                    return drafted
                raise RemoteBadResponse("the upstream returned no positions")
            except RemoteUnavailable as exc:
                log.warning("model %s: %s; the draft is asked for again, whole", model.name, exc)
            except RemoteBadResponse as exc:
                unstreamable = True
                log.warning("model %s: a streamed draft was unusable (%s); asked for again, whole", model.name, exc)
            finally:
                if not drafted.received:
                    await drafted.close()
            whole = await _whole(model, ctx, n, greedy=greedy, seed=seed, stats=stats)
            if unstreamable:
                adapter.capabilities = dataclasses.replace(adapter.capabilities, streams_drafts=False)
                log.warning("model %s: its streams carry no usable logprobs; drafts are asked for whole", model.name)
            return whole
    return await _whole(model, ctx, n, greedy=greedy, seed=seed, stats=stats)


async def _whole(model: Served, ctx: Context, n: int, *, greedy: bool, seed: int | None, stats: ChoiceStats) -> Drafted:
    """One whole draft of ``model`` (:meth:`adapters.base.RemoteAdapter.draft`)."""
    draft = await model.adapter.draft(ctx, n_tokens=n, top_k=model.top_k, seed=seed, greedy=greedy)
    stats.remote_calls += draft.calls
    if not draft.positions:
        raise RemoteBadResponse("the upstream returned no positions")
    return Drafted(ctx.assistant_prefix, n, draft.positions, prompt_tokens=draft.prompt_tokens)
