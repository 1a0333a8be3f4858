"""Request budgets for the upstream API.

The platform allows a number of requests per second per account. Every request
the bridge makes - first tries and retries alike - first takes a token here, so
the budget holds however many batches are polled at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class RateLimiter(Protocol):
    async def acquire(self) -> None:
        """Wait until one more request fits the budget."""

    def penalize(self, seconds: float) -> None:
        """Take no more tokens for `seconds` (the server said Retry-After)."""


class TokenBucket:
    """An in-process token bucket: `rate` tokens per second, bursts up to `burst`.

    Waiters are served in arrival order (an asyncio.Lock is fair), so one busy
    batch cannot starve the others.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        # A burst of one second's worth would let two adjacent seconds see up to
        # 2x the rate; a burst of 1 keeps every 1 s window within rate + 1.
        self.burst = max(1.0, burst if burst is not None else 1.0)
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()
        self._blocked_until = 0.0
        self._lock = asyncio.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                if now < self._blocked_until:
                    await asyncio.sleep(self._blocked_until - now)
                    continue
                self._refill(now)
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)

    def penalize(self, seconds: float) -> None:
        if seconds > 0:
            self._blocked_until = max(self._blocked_until, self._clock() + seconds)
            # Do not let a burst accumulate while blocked.
            self._tokens = 0.0
            self._updated = max(self._updated, self._blocked_until)
