"""The admin API under ``/v1``: batches, timelines, subscriptions, dead letters, replay,
recovery of a time window, the event catalog.

A sub-application with one middleware in front of every route: the API exists
only when ``admin.token`` is set (otherwise every route answers 404), and each
request needs ``Authorization: Bearer <token>``, compared in constant time.
Errors use the upstream API's envelope style. The routes are described in
``openapi.json`` (served at ``/v1/openapi.json``).
"""

from __future__ import annotations

import hmac
from datetime import datetime
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from callbridge.api.catalog import catalog
from callbridge.api.health import BRIDGE
from callbridge.api.recent import RECENT
from callbridge.config import BatchSettings
from callbridge.operations import Operations, UnknownSubscriptionError

# Event ids one replay request may name.
MAX_REPLAY_IDS = 1000


class BadRequest(Exception):
    """A request the admin API cannot act on; answered 400 with this message."""


def envelope(status: int, message: str, data: Any = None, code: str | None = None) -> web.Response:
    body: dict[str, Any] = {
        "status_code": status,
        "message": message,
        "error": None if code is None else {"code": code, "details": [message]},
        "data": data,
    }
    return web.json_response(body, status=status)


def _ops(request: web.Request) -> Operations:
    return request.config_dict[BRIDGE].operations


def _auth_middleware(token: str | None) -> Any:
    expected = token.encode() if token else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
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

    return guard


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


def _page(request: web.Request, default_limit: int) -> tuple[int, int]:
    """``limit`` (clamped to 1-1000) and ``offset`` (clamped to >= 0) of a listing."""
    try:
        limit = min(1000, max(1, int(request.query.get("limit", str(default_limit)))))
        # Redis ranges are signed 64-bit: an offset past any real list is just empty.
        offset = min(10**12, max(0, int(request.query.get("offset", "0"))))
    except ValueError:
        raise BadRequest("limit and offset must be integers") from None
    return limit, offset


async def list_batches(request: web.Request) -> web.Response:
    return envelope(200, "Batches", await _ops(request).list_batches())


async def add_batch(request: web.Request) -> web.Response:
    doc = await _json(request)
    try:
        batch = BatchSettings.model_validate(doc)
    except ValueError:
        raise BadRequest(
            'expected {"id": "<1-128 of letters, digits, _ . : ->", "backfill": true|false}'
        ) from None
    added = await _ops(request).add_batch(batch.id, batch.backfill)
    return envelope(
        201 if added else 200, "Batch added" if added else "Batch already watched", {"id": batch.id}
    )


async def delete_batch(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    if await _ops(request).remove_batch(batch_id):
        return envelope(200, "Batch removed", {"id": batch_id})
    return envelope(404, f"No batch watched with id {batch_id}", code="NOT_FOUND")


async def list_calls(request: web.Request) -> web.Response:
    batch_id = request.match_info["batch_id"]
    limit, offset = _page(request, 50)
    status = request.query.get("status") or None
    data = await _ops(request).calls(batch_id, status, limit, offset)
    if data is None:
        return envelope(404, f"No batch watched with id {batch_id}", code="NOT_FOUND")
    return envelope(200, "Calls", data)


async def call_timeline(request: web.Request) -> web.Response:
    batch_id, call_id = request.match_info["batch_id"], request.match_info["call_id"]
    data = await _ops(request).timeline(batch_id, call_id)
    if data is None:
        return envelope(404, f"No call {call_id} observed in batch {batch_id}", code="NOT_FOUND")
    return envelope(200, "Call timeline", data)


async def list_subscriptions(request: web.Request) -> web.Response:
    subs = await _ops(request).list_subscriptions()
    # This replica's deliveries over the last minutes (sampled while the console is on).
    window = request.config_dict.get(RECENT)
    recent = window.stats(s["name"] for s in subs) if window is not None else {}
    for sub in subs:
        sub["recent"] = recent.get(sub["name"])
    return envelope(200, "Subscriptions", subs)


async def enable_subscription(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _ops(request).enable(name)
    return envelope(200, "Subscription enabled", {"name": name})


async def list_dead_letters(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    limit, offset = _page(request, 100)
    ops = _ops(request)
    items = await ops.dead_letters(name, limit, offset)
    total = await ops.dead_letter_count(name)
    return envelope(
        200, "Dead letters", {"items": items, "total": total, "limit": limit, "offset": offset}
    )


async def replay_dead_letters(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    doc = await _json(request)
    ids = doc.get("ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        return envelope(400, "ids must be a list of event ids", code="VALIDATION_ERROR")
    if ids is not None and len(ids) > MAX_REPLAY_IDS:
        # One request stays one bounded piece of work; a whole window is a recovery job.
        return envelope(
            400,
            f"at most {MAX_REPLAY_IDS} ids per request (POST .../recover re-sends a window)",
            code="VALIDATION_ERROR",
        )
    if ids is None:
        # Every dead letter: a background job over what is dead now, whatever its size.
        # `replayed` stays for a previous release's CLI: none yet, the job does it.
        job = await _ops(request).replay_all(name)
        return envelope(202, "Replay of every dead letter started", {"job": job, "replayed": 0})
    n = await _ops(request).replay(name, ids)
    return envelope(200, "Dead letters replayed", {"replayed": n})


def _instant_ms(doc: dict[str, Any], key: str, *, required: bool) -> int:
    """``since``/``until`` of a request: an RFC 3339 time with its zone, or epoch ms."""
    value = doc.get(key)
    if value is None and not required:
        return 0
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, str):
        # RFC 3339 allows lower-case t/z and a leap second, which fromisoformat does not.
        text = value.upper().replace("Z", "+00:00").replace(":60", ":59")
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if at.tzinfo is not None:
                return max(0, int(at.timestamp() * 1000))
    raise BadRequest(f"{key} must be an RFC 3339 time with a zone (or epoch milliseconds)")


async def start_recovery(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    doc = await _json(request)
    since_ms = _instant_ms(doc, "since", required=True)
    # An until at or before since is an empty window: a job that finds nothing.
    until_ms = _instant_ms(doc, "until", required=False)
    job, created = await _ops(request).recover(name, since_ms, until_ms)
    if created:
        return envelope(202, "Recovery started", job)
    return envelope(200, "Recovery of that window already exists", job)


async def list_recoveries(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    return envelope(200, "Recovery jobs", await _ops(request).recoveries(name))


async def get_recovery(request: web.Request) -> web.Response:
    name, job_id = request.match_info["name"], request.match_info["job_id"]
    job = await _ops(request).recovery(name, job_id)
    if job is None:
        return envelope(404, f"No recovery job {job_id} of {name}", code="NOT_FOUND")
    return envelope(200, "Recovery job", job)


async def redeliver_event(request: web.Request) -> web.Response:
    event_id = request.match_info["event_id"]
    subs = await _ops(request).redeliver(event_id)
    if not subs:
        return envelope(404, f"No delivery record of event {event_id}", code="NOT_FOUND")
    return envelope(
        200, "Event scheduled for redelivery", {"event_id": event_id, "subscriptions": subs}
    )


async def list_event_types(request: web.Request) -> web.Response:
    return envelope(200, "Event types", catalog())


async def openapi(request: web.Request) -> web.Response:
    text = resources.files(__package__).joinpath("openapi.json").read_text()
    return web.Response(text=text, content_type="application/json")


def admin_app(token: str | None) -> web.Application:
    """The ``/v1`` sub-application; every route answers 404 when `token` is None."""
    app = web.Application(middlewares=[_auth_middleware(token)])
    r = app.router
    r.add_get("/openapi.json", openapi)
    r.add_get("/batches", list_batches)
    r.add_post("/batches", add_batch)
    r.add_delete("/batches/{batch_id}", delete_batch)
    r.add_get("/batches/{batch_id}/calls", list_calls)
    r.add_get("/batches/{batch_id}/calls/{call_id}/timeline", call_timeline)
    r.add_get("/subscriptions", list_subscriptions)
    r.add_post("/subscriptions/{name}/enable", enable_subscription)
    r.add_get("/subscriptions/{name}/dead-letters", list_dead_letters)
    r.add_post("/subscriptions/{name}/dead-letters/replay", replay_dead_letters)
    r.add_post("/subscriptions/{name}/recover", start_recovery)
    r.add_get("/subscriptions/{name}/recover", list_recoveries)
    r.add_get("/subscriptions/{name}/recover/{job_id}", get_recovery)
    r.add_post("/events/{event_id}/redeliver", redeliver_event)
    r.add_get("/event-types", list_event_types)
    return app
