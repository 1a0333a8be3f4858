"""HTTP surface: liveness, readiness, Prometheus metrics and the admin API.

The admin API under ``/v1`` exists only when ``admin.token`` is set; otherwise
its routes answer 404. Requests need ``Authorization: Bearer <token>``, compared
in constant time. Errors use the upstream API's envelope style.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from callbridge.admin import UnknownSubscriptionError
from callbridge.config import BatchSettings, Settings

if TYPE_CHECKING:
    from callbridge.app import Service

log = logging.getLogger(__name__)

SERVICE: web.AppKey[Service] = web.AppKey("service")


class BadRequest(Exception):
    """A request the admin API cannot act on; answered 400 with this message."""


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def envelope(status: int, message: str, data: Any = None, code: str | None = None) -> web.Response:
    body: dict[str, Any] = {
        "status_code": status,
        "message": message,
        "error": None if code is None else {"code": code, "details": [message]},
        "data": data,
    }
    return web.json_response(body, status=status)


def _service(request: web.Request) -> Service:
    return request.app[SERVICE]


async def healthz(request: web.Request) -> web.Response:
    ok, why = _service(request).alive()
    return web.json_response(
        {"status": "ok" if ok else "fail", "detail": why}, status=200 if ok else 503
    )


async def readyz(request: web.Request) -> web.Response:
    svc = _service(request)
    checks: dict[str, str] = {"config": "ok"}
    try:
        await svc.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"fail: {type(exc).__name__}"
    checks["upstream_auth"] = "ok" if svc.poller.upstream_auth_ok else "fail: API key rejected"
    ready = all(v == "ok" for v in checks.values()) and not svc.stopping.is_set()
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    svc = _service(request)
    return web.Response(
        body=generate_latest(svc.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def _admin_guard(token: str | None) -> Callable[[Handler], Handler]:
    expected = token.encode() if token else None

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if expected is None:
                return envelope(404, "Not found", code="NOT_FOUND")
            auth = request.headers.get("Authorization", "")
            scheme, _, given = auth.partition(" ")
            # Header bytes that are not UTF-8 arrive as surrogates: compare, never crash.
            given_bytes = given.encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, expected):
                resp = envelope(401, "Missing or invalid admin token", code="UNAUTHORIZED")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="callbridge-admin"'
                return resp
            try:
                return await handler(request)
            except UnknownSubscriptionError as exc:
                return envelope(404, str(exc), code="NOT_FOUND")
            except BadRequest as exc:
                return envelope(400, str(exc), code="VALIDATION_ERROR")

        return guarded

    return wrap


async def _json(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        doc = await request.json()
    except ValueError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    return doc


async def list_batches(request: web.Request) -> web.Response:
    return envelope(200, "Batches", await _service(request).operations.list_batches())


async def add_batch(request: web.Request) -> web.Response:
    doc = await _json(request)
    try:
        batch = BatchSettings.model_validate(doc)
    except ValueError:
        raise BadRequest(
            'expected {"id": "<1-128 of letters, digits, _ . : ->", "backfill": true|false}'
        ) from None
    batch_id, backfill = batch.id, batch.backfill
    added = await _service(request).operations.add_batch(batch_id, backfill)
    return envelope(
        201 if added else 200, "Batch added" if added else "Batch already watched", {"id": batch_id}
    )


async def delete_batch(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    if await _service(request).operations.remove_batch(batch_id):
        return envelope(200, "Batch removed", {"id": batch_id})
    return envelope(404, f"No batch watched with id {batch_id}", code="NOT_FOUND")


async def call_timeline(request: web.Request) -> web.Response:
    batch_id, call_id = request.match_info["batch_id"], request.match_info["call_id"]
    data = await _service(request).operations.timeline(batch_id, call_id)
    if data is None:
        return envelope(404, f"No call {call_id} observed in batch {batch_id}", code="NOT_FOUND")
    return envelope(200, "Call timeline", data)


async def list_subscriptions(request: web.Request) -> web.Response:
    return envelope(200, "Subscriptions", await _service(request).operations.list_subscriptions())


async def enable_subscription(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _service(request).operations.enable(name)
    return envelope(200, "Subscription enabled", {"name": name})


async def list_dead_letters(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        # Redis ranges are signed 64-bit: an offset past any real list is just empty.
        offset = min(10**12, max(0, int(request.query.get("offset", "0"))))
    except ValueError:
        return envelope(400, "limit and offset must be integers", code="VALIDATION_ERROR")
    items = await _service(request).operations.dead_letters(name, limit, offset)
    return envelope(200, "Dead letters", {"items": items, "limit": limit, "offset": offset})


async def replay_dead_letters(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    doc = await _json(request)
    ids = doc.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        return envelope(400, "ids must be a list of event ids", code="VALIDATION_ERROR")
    n = await _service(request).operations.replay(name, ids)
    return envelope(200, "Dead letters replayed", {"replayed": n})


async def redeliver_event(request: web.Request) -> web.Response:
    event_id = request.match_info["event_id"]
    subs = await _service(request).operations.redeliver(event_id)
    if not subs:
        return envelope(404, f"No delivery record of event {event_id}", code="NOT_FOUND")
    return envelope(
        200, "Event scheduled for redelivery", {"event_id": event_id, "subscriptions": subs}
    )


async def openapi(request: web.Request) -> web.Response:
    text = resources.files("callbridge").joinpath("openapi.json").read_text()
    return web.Response(text=text, content_type="application/json")


def add_routes(app: web.Application, settings: Settings) -> None:
    token = settings.admin.token.get_secret_value() if settings.admin.token else None
    guard = _admin_guard(token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", guard(openapi))
    app.router.add_get("/v1/batches", guard(list_batches))
    app.router.add_post("/v1/batches", guard(add_batch))
    app.router.add_delete("/v1/batches/{batch_id}", guard(delete_batch))
    app.router.add_get("/v1/batches/{batch_id}/calls/{call_id}/timeline", guard(call_timeline))
    app.router.add_get("/v1/subscriptions", guard(list_subscriptions))
    app.router.add_post("/v1/subscriptions/{name}/enable", guard(enable_subscription))
    app.router.add_get("/v1/subscriptions/{name}/dead-letters", guard(list_dead_letters))
    app.router.add_post("/v1/subscriptions/{name}/dead-letters/replay", guard(replay_dead_letters))
    app.router.add_post("/v1/events/{event_id}/redeliver", guard(redeliver_event))
