"""A TCP proxy in front of Redis that loses one reply, as a network can.

The client's request reaches Redis and runs; the reply never comes back and the
connection drops, so the client (redis-py with callbridge's retry policy) sends
the same command again on a new connection. It can also hold back the replies to
some requests a while (a slow link): what a caller does meanwhile is then seen; or
keep one request from Redis for good, so that its sender can be killed right
before that step.
"""

from __future__ import annotations

import asyncio
import contextlib


class ReplyDropper:
    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._armed: bytes | None = None
        self._armed_times = 0
        self._lose_request = False
        self._slow: tuple[bytes, float] | None = None
        self._held: bytes | None = None
        # Set once a request that `hold` names arrived (and was kept from Redis).
        self.held = asyncio.Event()
        self._pumps: set[asyncio.Task[None]] = set()
        self.dropped = 0
        # Set once a request whose reply is held back (`slow`) went through.
        self.holding = asyncio.Event()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def arm(self, marker: bytes, times: int = 1, *, request: bool = False) -> None:
        """Lose the replies to the next `times` requests containing `marker` (more than
        the client's retries: the caller sees the error); with `request`, lose the
        requests themselves (they never run, as in an outage)."""
        self._armed = marker
        self._armed_times = times
        self._lose_request = request

    def disarm(self) -> None:
        self._armed = None

    def hold(self, marker: bytes) -> None:
        """Keep the next request containing `marker` from Redis, and everything after
        it on that connection: it never runs (its sender may then be killed)."""
        self._held = marker

    def slow(self, marker: bytes, seconds: float) -> None:
        """Hold back the reply to every request containing `marker` for `seconds`."""
        self._slow = (marker, seconds)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        ureader, uwriter = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        swallow = asyncio.Event()
        hold = [0.0]  # seconds the next reply waits (redis-py awaits each reply)

        async def client_to_redis() -> None:
            while data := await creader.read(65536):
                if self._held is not None and self._held in data:
                    self._held = None
                    self.held.set()
                    await asyncio.Event().wait()  # until the proxy closes
                if self._armed is not None and self._armed in data:
                    self._armed_times -= 1
                    if self._armed_times <= 0:
                        self._armed = None
                    swallow.set()
                    if self._lose_request:
                        self.dropped += 1
                        return  # the connection drops before Redis sees the request
                if self._slow is not None and self._slow[0] in data:
                    hold[0] = self._slow[1]
                    self.holding.set()
                uwriter.write(data)
                await uwriter.drain()

        async def redis_to_client() -> None:
            while data := await ureader.read(65536):
                if swallow.is_set():
                    self.dropped += 1
                    return  # the reply is lost with the connection
                if hold[0]:
                    await asyncio.sleep(hold[0])
                    hold[0] = 0.0
                cwriter.write(data)
                await cwriter.drain()

        tasks = [asyncio.create_task(client_to_redis()), asyncio.create_task(redis_to_client())]
        self._pumps.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pumps.difference_update(tasks)
        for w in (cwriter, uwriter):
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
