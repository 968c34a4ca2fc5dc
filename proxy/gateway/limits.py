"""Per-key limits: requests in flight and requests per minute.

Per key (all clients together when there are no keys): requests in flight and
requests per minute (moving window, the ``limits`` package); over either, 429
with ``Retry-After`` (seconds) and OpenAI's ``rate_limit_exceeded`` body. The
per-minute counts live in this process's memory, or in Redis
(``server.limits_storage``), shared by replicas; a Redis that does not answer is a 503
(retryable), never a request let through uncounted.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from proxy.config import ClientKey, ServerConfig
from proxy.protocol.errors import ProxyError


class Limits:
    """Per-key requests in flight and requests per minute."""

    def __init__(self, settings: ServerConfig) -> None:
        self.settings = settings
        self.active: Counter[str] = Counter()
        self.storage = storage(settings.limits_storage)
        self.window = MovingWindowRateLimiter(self.storage)

    async def check(self) -> None:
        """Raise unless the per-minute counts' storage answers (``GET /ready``).

        Raises:
            ConnectionError: Redis does not answer.
        """
        if not await self.storage.check():
            raise ConnectionError(f"the rate-limit storage {_shown(self.settings.limits_storage)} does not answer")

    def _for(self, key: ClientKey | None) -> tuple[str, int, int]:
        s = self.settings
        if key is None:
            return "-", s.key_max_concurrent, s.key_rpm
        return key.id, key.max_concurrent or s.key_max_concurrent, key.rpm or s.key_rpm

    async def enter(self, key: ClientKey | None) -> str:
        """Take a slot for ``key``; returns the slot's name for :meth:`leave`.

        Raises:
            ProxyError: 429 with ``Retry-After`` when a limit is reached.
        """
        name, concurrent, rpm = self._for(key)
        if self.active[name] >= concurrent:
            raise ProxyError(
                429,
                f"Too many requests in flight for this key (limit {concurrent}); retry when one has finished",
                "requests",
                None,
                "rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        item = RateLimitItemPerMinute(rpm)
        try:
            allowed = await self.window.hit(item, name)
            stats = None if allowed else await self.window.get_window_stats(item, name)
        except Exception as exc:  # redis-py's ConnectionError, TimeoutError, ResponseError ...
            raise ProxyError(
                503,
                f"the rate-limit storage does not answer ({type(exc).__name__}); retry shortly",
                "server_error",
                None,
                "limits_unavailable",
                headers={"Retry-After": "1"},
            ) from exc
        if stats is not None:
            wait = max(1, math.ceil(stats.reset_time - time.time()))
            raise ProxyError(
                429,
                f"Rate limit reached: {rpm} requests per minute for this key; retry in {wait} s",
                "requests",
                None,
                "rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
        self.active[name] += 1
        return name

    def leave(self, name: str) -> None:
        self.active[name] -= 1
        if self.active[name] <= 0:
            del self.active[name]


def storage(url: str | None) -> Storage:
    """The ``limits`` storage for ``server.limits_storage``: memory (None) or Redis (a
    ``redis://``, ``rediss://`` or ``redis+unix://`` URL, through redis-py's asyncio client)."""
    if url is None:
        return MemoryStorage()
    return RedisStorage("async+" + url, implementation="redispy", key_prefix="deltaproxy", socket_timeout=2)


def _shown(url: str | None) -> str:
    """A storage URL without its password, for messages."""
    if url is None:
        return "memory"
    head, sep, tail = url.partition("@")
    return url if not sep else head.split("://")[0] + "://…@" + tail
