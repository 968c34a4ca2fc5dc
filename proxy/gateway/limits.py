"""Per-key limits: requests in flight and requests per minute.

Per key (all clients together when there are no keys): requests in flight and
requests per minute (moving window, the ``limits`` package); over either, 429
with ``Retry-After`` (seconds) and OpenAI's ``rate_limit_exceeded`` body.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from proxy.config import ClientKey, ServerConfig
from proxy.protocol.errors import ProxyError


class Limits:
    """Per-key requests in flight and requests per minute."""

    def __init__(self, settings: ServerConfig) -> None:
        self.settings = settings
        self.active: Counter[str] = Counter()
        self.window = MovingWindowRateLimiter(MemoryStorage())

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
        if not await self.window.hit(item, name):
            stats = await self.window.get_window_stats(item, name)
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
