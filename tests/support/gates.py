"""Middlewares in front of the simulator: one that fails or holds chosen pages, one that
moves a call right after the next unfiltered page."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from callbridge.simulator import Simulator


class PageGate:
    """Answers 503 to the pages named in `failing` (the simulator sees no request),
    and holds the pages named in `held` until `release()`: `asked` is set when a
    held page has been asked for."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.held: set[str] = set()
        self.asked = asyncio.Event()
        self._open = asyncio.Event()

    def release(self) -> None:
        self._open.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        page = request.query.get("page", "1")
        if page in self.failing:
            return web.json_response({"error": {"code": "UNAVAILABLE"}}, status=503)
        if page in self.held:
            self.asked.set()
            await self._open.wait()
        return await handler(request)


def after_unfiltered_page(
    sim: Simulator, batch_id: str, call_id: str, fields: dict[str, Any]
) -> Any:
    """A middleware that sets `fields` of `call_id` (`Simulator.set_call`) once the next
    page without ``status`` or ``external_id`` has been served (an active plan's page at
    the dialler's frontier, or a full scan's page), then empties `fields`; nothing
    while `fields` is empty."""

    @web.middleware
    async def platform_moves(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        filtered = "status" in request.query or "external_id" in request.query
        if fields and not filtered:
            sim.set_call(batch_id, call_id, **fields)
            fields.clear()
        return response

    return platform_moves
