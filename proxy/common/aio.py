"""asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(*aws: Awaitable[T]) -> list[T]:
    """The results of ``aws`` in order, as :func:`asyncio.gather`; when one fails or the
    caller is cancelled, the others are cancelled and awaited before the error propagates.

    Plain ``gather`` leaves the others running in the background after the first error:
    an audit or a batch would go on calling the model, and write to a file its caller has
    closed. :class:`asyncio.TaskGroup` cancels too, but raises an ``ExceptionGroup``; this
    raises the first error itself (``AuditError``, ``RemoteError``), as callers expect.
    """
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
