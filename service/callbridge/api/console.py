"""The operator console at ``/ui/``: static HTML, CSS and JavaScript over the admin API.

There is no server-side rendering and no credential of its own: the page asks the
operator for the admin token, keeps it in the tab's ``sessionStorage`` and sends it
as ``Authorization: Bearer`` to ``/v1``. With no cookie, a cross-site request has
nothing to ride on. The files ship inside the package (no build step, nothing
fetched from the network) and are served with a strict Content-Security-Policy:
scripts and styles only from these files, no inline code, no framing.

Mounted only when the admin API is on. Its start-up context also samples the
delivery metrics for the console's "last minutes" figures (`recent.DeliveryWindow`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

from callbridge.api.health import BRIDGE
from callbridge.api.recent import RECENT, DeliveryWindow

PREFIX = "/ui"

SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; font-src 'none'; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # The files are small; always revalidated so an upgrade is seen at once.
    "Cache-Control": "no-cache",
}

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file of ``api/static`` with a known type: name -> (content, content type)."""
    root = resources.files(__package__).joinpath("static")
    out = {}
    for entry in root.iterdir():
        kind = _CONTENT_TYPES.get("." + entry.name.rpartition(".")[2])
        if entry.is_file() and kind is not None:
            out[entry.name] = (entry.read_bytes(), kind)
    return out


def _handler(content: bytes, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            body=content, headers={"Content-Type": content_type, **SECURITY_HEADERS}
        )

    return serve


async def _to_index(request: web.Request) -> web.Response:
    # Relative links in the page (./app.js, ../v1/...) need the trailing slash.
    raise web.HTTPFound(f"{PREFIX}/", headers=SECURITY_HEADERS)


async def _sample_deliveries(app: web.Application) -> AsyncIterator[None]:
    window = DeliveryWindow(app[BRIDGE].metrics_registry)
    app[RECENT] = window
    task = asyncio.create_task(window.run(), name="console-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def add_console_routes(app: web.Application) -> None:
    """Serve the console under ``/ui/`` (call only when the admin API is on).

    Add after the cleanup context that sets `BRIDGE`: the sampler reads its metrics.
    """
    files = static_files()
    app.router.add_get(PREFIX, _to_index)
    index, kind = files.pop("index.html")
    app.router.add_get(f"{PREFIX}/", _handler(index, kind))
    for name, (content, kind) in sorted(files.items()):
        app.router.add_get(f"{PREFIX}/{name}", _handler(content, kind))
    app.cleanup_ctx.append(_sample_deliveries)
