"""The request budget for the upstream API.

The platform allows a number of requests per second per account. Every request
the bridge makes - first tries and retries alike, from every replica - first takes
a slot here, so the budget holds however many batches and replicas poll at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from callbridge.store.scripts import register


class RateLimiter(Protocol):
    async def acquire(self, expected: int = 1) -> None:
        """Wait until one more request fits the budget (`expected`: how many will follow)."""

    def penalize(self, seconds: float) -> None:
        """Take no more tokens for `seconds` (the server said Retry-After)."""


class RedisRateLimiter:
    """The request budget shared by every replica, kept in one Redis key.

    `rate` requests per second in total, however many replicas run. Slots are
    reserved in small blocks (a scan of many pages needs many) and handed out
    locally at their start times; a slot not used soon after its time (half an
    interval, at least 2 ms) is dropped, since using it late could put two requests
    in one slot's place.
    """

    def __init__(
        self,
        redis: Any,
        key: str,
        rate: float,
        *,
        max_block: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._redis = redis
        self._key = key
        # 5% headroom: requests leave on time but arrive with jitter (measured up
        # to ~36 ms on a loaded 2-core machine), and the platform counts arrivals.
        # Without it two requests squeezed together put rate + 1 into some window.
        self._interval_s = 1.05 / rate
        # How late a reserved slot may still be used. Half an interval at ordinary
        # rates; at high rates a few ms (far inside the 5% headroom of any window),
        # or slots microseconds apart would all be dropped before the next page.
        self._late_s = max(self._interval_s / 2, 0.002)
        # Never reserve more than a quarter second of the fleet's budget at once.
        self._max_block = max(1, min(max_block, int(rate / 4)))
        self._clock = clock
        self._slots: deque[float] = deque()
        # Until then (our clock) no slot handed out may be used: the platform said 429.
        self._paused_until = 0.0
        self._lock = asyncio.Lock()
        self._gcra = register(redis, "gcra")
        self._penalize = register(redis, "penalize")
        self._pending: set[asyncio.Task[Any]] = set()

    async def acquire(self, expected: int = 1) -> None:
        """Wait for a request slot; `expected` hints how many more this caller needs.

        A penalty (`penalize`) that arrives while a caller waits for its slot takes
        the slot back: the caller waits the penalty out, then takes a new one."""
        while True:
            start = await self._slot(expected)
            delay = start - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            pause = self._paused_until - self._clock()
            if pause <= 0:
                return
            await asyncio.sleep(pause)

    async def _slot(self, expected: int) -> float:
        """The start time of a slot of our own (reserved in blocks from Redis)."""
        async with self._lock:
            while True:
                now = self._clock()
                while self._slots and self._slots[0] < now - self._late_s:
                    self._slots.popleft()
                if self._slots:
                    return self._slots.popleft()
                n = max(1, min(expected, self._max_block))
                wait_ms = float(
                    await self._gcra(keys=[self._key], args=[self._interval_s * 1000, n])
                )
                first = self._clock() + wait_ms / 1000
                self._slots.extend(first + i * self._interval_s for i in range(n))

    def penalize(self, seconds: float) -> None:
        if seconds <= 0:
            return
        self._slots.clear()
        # Slots handed out already are taken back too (`acquire`).
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        # Called from sync code paths: the write runs as its own task.
        task = asyncio.ensure_future(self._penalize(keys=[self._key], args=[int(seconds * 1000)]))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
