"""A real HTTP receiver for tests, with scripted answers.

`answers` is consumed one per request: an int is the status to answer, "hang"
waits until the request times out on the sender's side, "redirect" answers 302 to
an internal address, "huge" streams a 50 MB body, "garbage" writes bytes that
are not HTTP, "drop" reads the request and closes the connection without an answer
(it counts as received, not delivered). When empty, `default` is answered.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    def payload(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(self.body)
        return doc


@dataclass
class Receiver:
    default: int | str = 200
    failure_text: str = "nope"  # the body of every non-2xx answer
    answers: deque[int | str] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    delivered: list[Received] = field(default_factory=list)  # answered 2xx
    release: asyncio.Event = field(default_factory=asyncio.Event)
    delay_s: float = 0.0  # every answer waits this long (a receiver that takes its time)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set on every request

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = Received(dict(request.headers), body)
        self.received.append(rec)
        self.arrived.set()
        answer = self.answers.popleft() if self.answers else self.default
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if answer == "hang":
            await self.release.wait()
            return web.Response(status=200)
        if answer == "redirect":
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data")
        if answer == "huge":
            resp = web.StreamResponse(status=200)
            await resp.prepare(request)
            chunk = b"x" * 65536
            try:
                for _ in range(800):  # 50 MB
                    await resp.write(chunk)
            except (ConnectionResetError, RuntimeError):
                pass
            return resp
        if answer == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=200)
        if answer == "garbage":
            assert request.transport is not None
            request.transport.write(b"\x00\x01 not http at all\r\n\r\n")
            request.transport.close()
            return web.Response(status=200)
        assert isinstance(answer, int)
        if 200 <= answer < 300:
            self.delivered.append(rec)
        headers = {"Retry-After": "1"} if answer in (429, 503) else {}
        return web.Response(
            status=answer, text="ok" if answer < 300 else self.failure_text, headers=headers
        )

    def verify_all(self, secret: str) -> list[dict[str, Any]]:
        """Verify every delivered request with the reference implementation.

        Fails when nothing was delivered: "every one of nothing verifies" proves nothing.
        """
        assert self.delivered, "nothing was delivered"
        wh = Webhook(secret)
        return [wh.verify(r.body, r.headers) for r in self.delivered]
