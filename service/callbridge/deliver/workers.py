"""The coroutines that run a subscription's attempts: started once, woken per delivery.

A task per delivery cost more than the hand-off to a waiting worker (create_task and
its done callbacks against one future: ~3.4 against ~1 µs a delivery), and started
later. Every claimed delivery handed over gets a worker of its own at once (an idle
one woken, or a new one), so its request starts in the next turn of the event loop:
its visibility deadline never runs while it waits. There are never more workers than
deliveries held at once (the subscription's slots).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from callbridge.store.records import Claimed


class Workers:
    """Runs `attempt(claimed)` for every delivery handed over, each in some worker."""

    def __init__(self, attempt: Callable[[Claimed], Awaitable[None]]) -> None:
        self._attempt = attempt
        self._ready: deque[Claimed] = deque()
        self._idle: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def start(self, claimed: list[Claimed]) -> None:
        """Hand over claimed deliveries: each wakes an idle worker or starts one."""
        self._ready.extend(claimed)
        for _ in claimed:
            while self._idle:
                fut = self._idle.pop()
                if not fut.done():
                    fut.set_result(None)
                    break
            else:
                task = asyncio.create_task(self._work())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._ready:
                await self._attempt(self._ready.popleft())
            if self._closing:
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._idle.append(fut)
            await fut

    async def close(self, grace_s: float) -> list[Claimed]:
        """Let running attempts finish within `grace_s`, then cancel them (an attempt
        cancelled hands its claim back). Returns deliveries handed over but never
        started (none unless cancelled before their worker ran)."""
        self._closing = True
        for fut in self._idle:
            fut.cancel()
        self._idle.clear()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        unstarted = list(self._ready)
        self._ready.clear()
        return unstarted
