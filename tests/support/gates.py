"""A middleware in front of the simulator that fails or holds chosen pages."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler


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
