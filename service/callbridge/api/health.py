"""Liveness, readiness and Prometheus metrics: what the orchestrator and Prometheus read."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from callbridge.operations import Operations


class BridgeView(Protocol):
    """What the HTTP layer needs of a running bridge."""

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The Prometheus registry to expose."""

    @property
    def operations(self) -> Operations:
        """Inspection and operator actions (the admin API)."""

    def alive(self) -> tuple[bool, str]:
        """Liveness: the loops run and are not stuck; the reason when not."""

    async def readiness(self) -> dict[str, str]:
        """One entry per dependency: ``ok`` or ``fail: <why>``; empty while stopping."""


BRIDGE: web.AppKey[BridgeView] = web.AppKey("bridge", BridgeView)


async def healthz(request: web.Request) -> web.Response:
    ok, why = request.config_dict[BRIDGE].alive()
    return web.json_response(
        {"status": "ok" if ok else "fail", "detail": why}, status=200 if ok else 503
    )


async def readyz(request: web.Request) -> web.Response:
    checks = await request.config_dict[BRIDGE].readiness()
    ready = bool(checks) and all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.config_dict[BRIDGE].metrics_registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
