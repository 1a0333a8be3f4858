"""The simulator's HTTP face: List Batch Calls, ``/healthz``, and fault injection.

How one List Batch Calls request is answered, in order:

1. the request's fault dice are drawn (always the same number of draws, so the
   fault stream depends only on how many requests came, never on their outcome);
   the reorder die comes from a stream of its own;
2. outage: during an outage window, a 503 envelope or a connection reset;
3. slow: sleep ``slow_seconds`` first, like a congested gateway, then go on;
4. auth: ``auth_fail`` or a missing/wrong Bearer key -> the documented 401;
5. rate limit -> 429 with ``Retry-After`` and a RATE_LIMITED error envelope;
6. server error -> 500 / 503 with an error envelope, or 502 with a proxy's HTML page;
7. unknown batch -> the documented 404; bad ``limit`` / ``page`` -> 400 VALIDATION_ERROR;
8. the page, possibly shifted (as if items were inserted/removed before it), then
   possibly swapped for a malformed 200 body derived from it;
9. reorder: once the page is built, the batch's order may change for the requests
   that follow (the rest of the client's scan).

Page bodies are assembled from each call's cached JSON bytes; nothing is
re-encoded per request.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import re
import socket
import struct

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from callbridge.constants import (
    UPSTREAM_CALLS_PATH,
    UPSTREAM_DEFAULT_PAGE_SIZE,
    UPSTREAM_MAX_PAGE_SIZE,
)
from callbridge.simulator.world import Simulator

__all__ = ["make_app"]

JSON_CONTENT_TYPE = "application/json"
MESSAGE_OK = "Batch calls fetched successfully"
MAX_SHIFT_ITEMS = 3
# Twelve digits is far beyond any real page number and keeps int() cheap.
_INTEGER = re.compile(r"[+-]?[0-9]{1,12}")


def _envelope(status: int, message: str, code: str, details: list[str]) -> bytes:
    return orjson.dumps(
        {
            "status_code": status,
            "message": message,
            "error": {"code": code, "details": details},
            "data": None,
        }
    )


_UNAUTHORIZED_BODY = _envelope(
    401,
    "Missing or invalid API key",
    "UNAUTHORIZED",
    ["Provide a valid Bearer token in the Authorization header"],
)
_INTERNAL_ERROR_BODY = _envelope(
    500, "Internal server error", "INTERNAL_ERROR", ["An unexpected error occurred"]
)
_UNAVAILABLE_BODY = _envelope(
    503,
    "Service temporarily unavailable",
    "SERVICE_UNAVAILABLE",
    ["The service is temporarily unavailable, please retry later"],
)
_BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_MAINTENANCE_HTML = (
    b"<!DOCTYPE html><html><head><title>Scheduled maintenance</title></head>"
    b"<body><h1>We'll be back soon</h1><p>The API is under maintenance.</p></body></html>"
)
_HEAD = b'{"status_code":200,"message":"' + MESSAGE_OK.encode() + b'","error":null,"data":'


def _page_body(items: list[bytes], total: int, page: int, limit: int, has_more: bool) -> bytes:
    return b"".join(
        (
            _HEAD,
            b'{"items":[',
            b",".join(items),
            b'],"total":%d,"page":%d,"limit":%d,"has_more":%s}}'
            % (total, page, limit, b"true" if has_more else b"false"),
        )
    )


def _malformed_body(kind: str, body: bytes, items: list[bytes], page: int) -> bytes:
    joined = b",".join(items)
    if kind == "truncated":
        return body[: len(body) // 2]
    if kind == "html":
        return _MAINTENANCE_HTML
    if kind == "no_data":
        return _HEAD + b"null}"
    if kind == "items_not_list":
        return _HEAD + b'{"items":{"calls":[' + joined + b']},"page":%d}}' % page
    if kind == "missing_fields":
        return _HEAD + b'{"items":[' + joined + b'],"page":%d}}' % page
    if kind == "empty":
        return b""
    return b"[" + joined + b"]"


def _retry_after(seconds: float) -> str:
    # Retry-After is whole seconds by RFC 9110; sub-second values are a testing
    # convenience that clients parsing a float understand.
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _parse_int(
    request: web.Request, name: str, default: int, low: int, high: int | None
) -> tuple[int, str | None]:
    raw = request.query.get(name)
    if raw is None:
        return default, None
    bounds = f"between {low} and {high}" if high is not None else f">= {low}"
    problem = f"{name}: must be an integer {bounds}, got {raw[:40]!r}"
    if not _INTEGER.fullmatch(raw):
        return default, problem
    value = int(raw)
    if value < low or (high is not None and value > high):
        return default, problem
    return value, None


class _CallsApi:
    """Handlers bound to one simulator; owns the fault RNG of one app."""

    def __init__(self, simulator: Simulator) -> None:
        self._sim = simulator
        self._rng = random.Random(f"faults:{simulator.config.seed}")
        self._reorder_rng = random.Random(f"reorder:{simulator.config.seed}")
        self._token = simulator.config.api_key.encode()

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._token
        )

    async def list_calls(self, request: web.Request) -> web.Response:
        faults = self._sim.faults
        rng = self._rng
        slow, rate, error, shift, malformed = (rng.random() for _ in range(5))
        reorder = self._reorder_rng.random()
        if self._sim.in_outage():
            if faults.outage_kind == "reset":
                return _reset(request)
            return _json(503, _UNAVAILABLE_BODY)
        if slow < faults.slow_ratio:
            await asyncio.sleep(faults.slow_seconds)
        if faults.auth_fail or not self._authorized(request):
            return _json(401, _UNAUTHORIZED_BODY)
        if rate < faults.rate_limit_ratio:
            seconds = _retry_after(faults.retry_after_seconds)
            body = _envelope(
                429,
                "Too many requests",
                "RATE_LIMITED",
                [f"Rate limit exceeded, retry after {seconds} seconds"],
            )
            return _json(429, body, headers={"Retry-After": seconds})
        if error < faults.server_error_ratio:
            return self._server_error(rng.choice(faults.server_error_statuses))

        batch_id = request.match_info["batch_id"]
        if not self._sim.has_batch(batch_id):
            body = _envelope(
                404, "Batch not found", "NOT_FOUND", [f"No batch found with id {batch_id}"]
            )
            return _json(404, body)
        limit, limit_problem = _parse_int(
            request, "limit", UPSTREAM_DEFAULT_PAGE_SIZE, 1, UPSTREAM_MAX_PAGE_SIZE
        )
        page, page_problem = _parse_int(request, "page", 1, 1, None)
        problems = [p for p in (limit_problem, page_problem) if p is not None]
        if problems:
            return _json(
                400, _envelope(400, "Invalid query parameters", "VALIDATION_ERROR", problems)
            )

        # An empty filter is treated as absent, as form-encoding clients send it.
        status = request.query.get("status") or None
        external_id = request.query.get("external_id") or None
        offset = (page - 1) * limit
        total = self._sim.count(batch_id, status=status, external_id=external_id)
        start = offset
        if shift < faults.shift_ratio:
            start, total = self._shift(offset, total)
        items = self._sim.encoded_items(
            batch_id, status=status, external_id=external_id, start=start, stop=start + limit
        )
        body = _page_body(items, total, page, limit, offset + limit < total)
        served = self._sim.served_ids(
            batch_id, status=status, external_id=external_id, start=start, stop=start + limit
        )
        if reorder < faults.reorder_ratio:
            self._sim.reorder(batch_id, self._reorder_rng, faults.reorder_share)
        if malformed < faults.malformed_ratio:
            kind = rng.choice(faults.malformed_kinds)
            content_type = "text/html" if kind == "html" else JSON_CONTENT_TYPE
            return web.Response(
                status=200,
                body=_malformed_body(kind, body, items, page),
                content_type=content_type,
            )
        self._sim.record_served(batch_id, served)
        return _json(200, body)

    def _shift(self, offset: int, total: int) -> tuple[int, int]:
        """Where the shifted page starts in the real list, and the total it reports.

        Inserting k items before the page moves its window k back (repeating the
        previous page's tail); removing k moves it k forward (skipping items).
        Nothing can be inserted before the first page, so it only sees removals.
        """
        k = self._rng.randint(1, MAX_SHIFT_ITEMS)
        if offset > 0 and self._rng.random() < 0.5:
            k = min(k, offset)
            return offset - k, total + k
        k = min(k, total)
        return offset + k, total - k

    def _server_error(self, status: int) -> web.Response:
        if status == 502:
            return web.Response(status=502, body=_BAD_GATEWAY_HTML, content_type="text/html")
        return _json(status, _INTERNAL_ERROR_BODY if status == 500 else _UNAVAILABLE_BODY)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


def _reset(request: web.Request) -> web.Response:
    """Drop the connection with a TCP reset, no answer (a crashed gateway)."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # Never written (the transport is gone); the request log shows nginx's 444, the
    # code for a connection closed without an answer.
    return web.Response(status=444)


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type=JSON_CONTENT_TYPE, headers=headers)


def make_app(simulator: Simulator) -> web.Application:
    """The List Batch Calls API over `simulator`, plus ``GET /healthz``; no background task."""
    api = _CallsApi(simulator)

    @web.middleware
    async def record_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        received = simulator.clock()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            # The client went away before the answer (nginx's 499).
            status = 499
            raise
        finally:
            simulator.record_request(received, request.path_qs, status)

    app = web.Application(middlewares=[record_request])
    app.router.add_get(UPSTREAM_CALLS_PATH, api.list_calls)
    app.router.add_get("/healthz", api.healthz)
    return app
