"""Server-sent events for the streamed routes (chat and text completions, responses): the
stream is opened once the first item is decoded, and its ending is the same for every route.
A client that leaves ends it quietly; a server that stops sends an error item; a failure in the
middle is sent as an error item and the stream ends without its normal last line (so that a
client never takes a truncated answer for a whole one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiohttp import web

from proxy.gateway.gateway import cancelled_at_shutdown
from proxy.gateway.record import RequestRecord
from proxy.protocol.errors import ProxyError, from_exception

log = logging.getLogger(__name__)


async def send_events(
    request: web.Request,
    rec: RequestRecord | None,
    first: dict[str, Any] | None,
    rest: AsyncGenerator[dict[str, Any], None],
    *,
    encode: Callable[[dict[str, Any]], bytes],
    error_item: Callable[[ProxyError], dict[str, Any]],
    seen: Callable[[dict[str, Any]], None],
    last: bytes = b"",
    map_error: Callable[[BaseException], ProxyError] = from_exception,
) -> web.StreamResponse:
    """Send ``first`` and then ``rest``, each as ``encode(item)`` (``seen(item)`` first), and
    ``last`` after the final one (chat's ``data: [DONE]``). A failure is sent as
    ``encode(error_item(map_error(exc)))`` and noted in ``rec``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    if rec is not None:
        rec.streamed = True
    await response.prepare(request)
    try:
        if first is not None:
            seen(first)
            await response.write(encode(first))
        async for item in rest:
            seen(item)
            await response.write(encode(item))
    except (ConnectionResetError, ConnectionError):
        await rest.aclose()
        if rec is not None:
            rec.error = "client_closed_request"
        return response
    except asyncio.CancelledError:
        # The server is stopping (or the client left): end the stream with an error item, not a bare cut.
        err = cancelled_at_shutdown()
        if rec is not None:
            rec.error = err.code
        with contextlib.suppress(Exception):
            await response.write(encode(error_item(err)))
            await response.write_eof()
        raise
    except Exception as exc:
        err = map_error(exc)
        if rec is not None:
            rec.error = err.code or err.type
        log.error("stream %s failed mid-way: %s", request.path, exc)
        await response.write(encode(error_item(err)))
        await response.write_eof()
        return response
    if last:
        await response.write(last)
    await response.write_eof()
    return response
