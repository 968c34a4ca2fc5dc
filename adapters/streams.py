"""The seam of streamed drafts (:class:`DraftStream`, :class:`DraftStreamingAdapter`): what the
decoder asks of a remote that streams a draft's positions as it generates them
(:attr:`adapters.base.Capabilities.streams_drafts`). No HTTP types: the decoder imports it;
:mod:`adapters.draft_stream` implements it over an SSE stream.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .base import Context, Position


class DraftStream(Protocol):
    """A draft's positions in order, as the remote generates them (the same positions a
    :class:`Draft` of the same call holds): iterate, then ask :meth:`prompt_token_count`;
    :meth:`aclose` ends the request where the decoder needs no more (the remote stops).

    Iterating raises a :class:`RemoteError` (:class:`RemoteUnavailable` for a stream that
    broke off) only before the first position: a stream cut later ends the draft at the
    positions received (a draft's prefix is a draft)."""

    def want(self, count: int) -> None:
        """The decoder reads ``count`` more positions next (a remote that computes positions
        only when read computes that many at once; one that streams ignores it)."""
        ...

    async def prompt_token_count(self) -> int | None:
        """The remote's count of prompt tokens once the stream ended, where it can give one."""
        ...

    def __aiter__(self) -> DraftStream: ...

    async def __anext__(self) -> Position: ...

    async def aclose(self, *, drain: float = 0.0) -> None:
        """End the request; ``drain``: seconds a stream read to its last position may take to
        end by itself first (its usage chunk)."""
        ...


@runtime_checkable
class DraftStreamingAdapter(Protocol):
    """A remote that streams drafts (:attr:`Capabilities.streams_drafts`)."""

    async def stream_draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> DraftStream | None:
        """:meth:`RemoteAdapter.draft`'s positions as a stream (the same request, sampling and
        positions), opened with the same retries; None where this call needs a whole draft
        (``n_tokens`` of 1, an accepted text that ends inside a character, which
        :meth:`RemoteAdapter.draft` heals, or a context the adapter does not stream).

        Raises:
            RemoteUnavailable, RemoteRejected: as :meth:`RemoteAdapter.draft`, when opening.
        """
        ...
