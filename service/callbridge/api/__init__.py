"""The HTTP surface on ``server.port``: probes, metrics and the admin API.

Handlers see the running bridge only through the small `BridgeView` protocol
(stored under the `BRIDGE` app key), never through its parts.
"""

from __future__ import annotations

from aiohttp import web

from callbridge.api.admin import admin_app
from callbridge.api.health import BRIDGE, BridgeView, add_health_routes

__all__ = ["BRIDGE", "BridgeView", "add_routes"]


def add_routes(app: web.Application, admin_token: str | None) -> None:
    """Mount the probes, ``/metrics`` and the ``/v1`` admin API on `app`."""
    add_health_routes(app)
    app.add_subapp("/v1", admin_app(admin_token))
