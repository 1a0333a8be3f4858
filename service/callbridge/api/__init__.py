"""The HTTP surface on ``server.port``: probes, metrics, the admin API and its console.

Handlers see the running bridge only through the small `BridgeView` protocol
(stored under the `BRIDGE` app key), never through its parts.
"""

from __future__ import annotations

from aiohttp import web

from callbridge.api.admin import admin_app
from callbridge.api.console import add_console_routes
from callbridge.api.health import BRIDGE, BridgeView, add_health_routes

__all__ = ["BRIDGE", "BridgeView", "add_routes"]


def add_routes(app: web.Application, admin_token: str | None) -> None:
    """Mount the probes, ``/metrics``, the ``/v1`` admin API and (with it) the ``/ui/`` console.

    Call after the cleanup context that sets `BRIDGE` has been added to `app`.
    """
    add_health_routes(app)
    app.add_subapp("/v1", admin_app(admin_token))
    if admin_token:
        add_console_routes(app)
