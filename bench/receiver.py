"""A webhook receiver in its own process, so its CPU does not compete in the bench process.

``python -m bench.receiver --port 0`` answers ``POST /hook`` with 200 after reading
the body. It counts requests and distinct ``webhook-id`` values, and verifies the
Standard Webhooks signature of every ``--verify-every``-th signed request with
`callbridge.deliver.signing.verify` (a sample: proof the deliveries are signed, at little
receiver CPU). ``GET /_stats`` returns the counters (with ``first_at``/``last_at``, the
``time.time()`` of the first and last signed request, and ``first_any_at``/
``last_any_at`` of any request, signed or not); ``POST /_reset`` clears them.
With ``--record`` it also keeps, per distinct ``webhook-id``, the ``time.time()`` the
request was received, the event type, ``data.batch_id``/``call_id``/``status`` and the
event ``timestamp`` (``GET /_events`` returns them), for the end-to-end lag benchmark;
and, for the ground-truth checker (`tests.support.turbulence`, in the planner benchmark),
per distinct id what the checker reads of the body (``GET /_hooks``: ``[id, received,
doc]``, doc cut down to ``type`` and the ``data`` fields it uses), counting ids that
arrived with two different bodies (``two_bodies`` in ``/_stats``). It prints
``READY <base url>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import zlib
from typing import Any

import orjson
from aiohttp import web

from bench.common import SECRET, serve_child
from callbridge.deliver.signing import SignatureError, verify


class Counters:
    def __init__(self, verify_every: int, record: bool = False) -> None:
        self.verify_every = verify_every
        self.record = record
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.signed = 0
        self.ids: set[str] = set()
        self.verified = 0
        self.bad_signatures = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.first_any_at = 0.0
        self.last_any_at = 0.0
        # [received, type, batch_id, call_id, status, event timestamp]
        self.events: list[list[Any]] = []
        # [webhook-id, received, the body cut down to what the checker reads]
        self.hooks: list[list[Any]] = []
        self.body_crcs: dict[str, int] = {}
        self.two_bodies = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_at": self.first_at,
            "last_at": self.last_at,
            "first_any_at": self.first_any_at,
            "last_any_at": self.last_any_at,
            "requests": self.requests,
            "signed": self.signed,
            "distinct_ids": len(self.ids),
            "verified": self.verified,
            "bad_signatures": self.bad_signatures,
            "two_bodies": self.two_bodies,
        }


_CHECKED_FIELDS = (
    "batch_id",
    "call_id",
    "status",
    "previous_status",
    "sequence",
    "missed_terminal",
    "skipped_statuses",
    "total",
)


def _checked(doc: dict[str, Any]) -> dict[str, Any]:
    """What `tests.support.turbulence.check` reads of an event body."""
    data = doc.get("data") or {}
    return {"type": doc.get("type"), "data": {k: data[k] for k in _CHECKED_FIELDS if k in data}}


def build_app(counters: Counters) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        received = time.time()
        counters.requests += 1
        if not counters.first_any_at:
            counters.first_any_at = received
        counters.last_any_at = received
        event_id = request.headers.get("webhook-id")
        if event_id is not None:
            counters.signed += 1
            if not counters.first_at:
                counters.first_at = received
            counters.last_at = received
            if counters.record and event_id not in counters.ids:
                doc = orjson.loads(body)
                data = doc.get("data") or {}
                counters.events.append(
                    [
                        received,
                        doc.get("type"),
                        data.get("batch_id"),
                        data.get("call_id"),
                        data.get("status"),
                        doc.get("timestamp"),
                    ]
                )
                counters.hooks.append([event_id, received, _checked(doc)])
            if counters.record:
                crc = zlib.crc32(body)
                if counters.body_crcs.setdefault(event_id, crc) != crc:
                    counters.two_bodies += 1
            counters.ids.add(event_id)
            if counters.signed % counters.verify_every == 1 or counters.verify_every == 1:
                try:
                    verify([SECRET], request.headers, body, now=int(time.time()))
                    counters.verified += 1
                except SignatureError:
                    counters.bad_signatures += 1
        return web.Response(status=200, text="ok")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counters.as_dict())

    async def events(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(counters.events), content_type="application/json")

    async def hooks(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(counters.hooks), content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        counters.reset()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_events", events)
    app.router.add_get("/_hooks", hooks)
    app.router.add_post("/_reset", reset)
    return app


async def main(port: int, verify_every: int, record: bool) -> None:
    await serve_child(build_app(Counters(verify_every, record)), port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--verify-every", type=int, default=50)
    parser.add_argument("--record", action="store_true", help="keep every event (GET /_events)")
    ns = parser.parse_args()
    asyncio.run(main(ns.port, ns.verify_every, ns.record))
