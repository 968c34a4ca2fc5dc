"""A draft read from a server-sent-event stream as the remote writes it (:class:`StreamedDraft`,
an :class:`adapters.streams.DraftStream`).

A task reads the stream into a queue, so the remote is read (and its chunks parsed) while
the decoder's pair scores the positions already received; the positions come out in order.
Closing the draft cancels the task and closes the response: vLLM and llama.cpp's servers
stop generating when the client goes away, so a draft cut at its first replaced token
costs the remote no more tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx2
import openai

from .base import Candidate, Position, RemoteBadResponse, RemoteError, RemoteUnavailable
from .utf8 import strip_held_back

log = logging.getLogger(__name__)


_END = object()


class StreamedDraft:
    """The positions of one streamed draft request.

    ``stream`` is the openai SDK's ``AsyncStream`` of completion chunks; ``positions(chunk)``
    gives the positions a chunk carries (none for a usage-only or finish chunk), ``usage(chunk)``
    its prompt token count or None (``count()`` asks the server otherwise); ``prefix`` the accepted text the draft continues
    (:func:`adapters.utf8.strip_held_back` runs over the positions as they come); ``eot`` the
    end-of-turn candidate, the draft's one position when the stream stops before any token.
    """

    def __init__(
        self,
        stream: Any,
        *,
        positions: Callable[[Any], Sequence[Position]],
        usage: Callable[[Any], int | None],
        prefix: bytes,
        eot: Candidate,
        what: str,
        count: Callable[[], Awaitable[int | None]] | None = None,
    ) -> None:
        self._prompt_tokens: int | None = None
        self._count = count
        self._stream = stream
        self._positions = positions
        self._usage = usage
        self._prefix = prefix
        self._eot = eot
        self._what = what
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        raw: list[Position] = []
        finish = None
        try:
            async for chunk in self._stream:
                if (count := self._usage(chunk)) is not None:
                    self._prompt_tokens = count
                for pos in self._positions(chunk):
                    raw.append(pos)
                    self._queue.put_nowait(strip_held_back(raw, self._prefix)[-1])
                choices = getattr(chunk, "choices", None)
                if choices and choices[0].finish_reason is not None:
                    finish = choices[0].finish_reason
            if not raw:
                if finish != "stop":
                    raise RemoteBadResponse("upstream returned no logprobs; it cannot serve token mode")
                self._queue.put_nowait(Position((self._eot,), self._eot))
        except asyncio.CancelledError:
            raise
        except RemoteError as exc:
            self._failed(exc, raw)
        except (httpx2.HTTPError, openai.APIError, ValueError) as exc:  # the stream broke off, or garbled
            self._failed(RemoteUnavailable(f"{self._what}: the draft's stream failed: {exc}"), raw)
        except Exception as exc:  # not the remote's doing: the caller sees it, never a cut draft
            self._queue.put_nowait(exc)
        finally:
            self._queue.put_nowait(_END)
            with contextlib.suppress(Exception):  # a broken connection is closed all the same
                await self._stream.close()

    def _failed(self, exc: RemoteError, raw: list[Position]) -> None:
        """Before any position the error is the draft's; after, the draft ends where it broke."""
        if raw:
            log.warning("%s; the draft ends after its %d positions received", exc, len(raw))
        else:
            self._queue.put_nowait(exc)

    def __aiter__(self) -> StreamedDraft:
        return self

    async def __anext__(self) -> Position:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # asking again ends at once
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def want(self, count: int) -> None:
        """Positions arrive as the server writes them."""

    async def prompt_token_count(self) -> int | None:
        """The remote's count of the prompt's tokens: its stream's usage, else ``count()``
        (one request, made only when asked), else None."""
        if self._prompt_tokens is None and self._count is not None:
            self._prompt_tokens = await self._count()
            self._count = None
        return self._prompt_tokens

    async def aclose(self, *, drain: float = 0.0) -> None:
        """End the request: the reading task is cancelled and the response closed; with
        ``drain`` (seconds), a stream already read to its last position is first given that
        long to end by itself, so that its usage chunk arrives."""
        if drain > 0 and not self._task.done():
            await asyncio.wait({self._task}, timeout=drain)
        self._task.cancel()
        await asyncio.wait({self._task})
