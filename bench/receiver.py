"""A webhook receiver in its own process, so its CPU does not compete in the bench process.

``python -m bench.receiver --port 0`` answers ``POST /hook`` with 200 after reading
the body. It counts requests and distinct ``webhook-id`` values, and verifies the
Standard Webhooks signature of every ``--verify-every``-th signed request with
`service.signing.verify` (a sample: proof the deliveries are signed, at little
receiver CPU). ``GET /_stats`` returns the counters; ``POST /_reset`` clears them.
It prints ``READY <base url>`` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

from aiohttp import web

from bench.common import SECRET, announce_ready
from service.signing import SignatureError, verify


class Counters:
    def __init__(self, verify_every: int) -> None:
        self.verify_every = verify_every
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.signed = 0
        self.ids: set[str] = set()
        self.verified = 0
        self.bad_signatures = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "signed": self.signed,
            "distinct_ids": len(self.ids),
            "verified": self.verified,
            "bad_signatures": self.bad_signatures,
        }


def build_app(counters: Counters) -> web.Application:
    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        counters.requests += 1
        event_id = request.headers.get("webhook-id")
        if event_id is not None:
            counters.signed += 1
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

    async def reset(request: web.Request) -> web.Response:
        counters.reset()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    return app


async def main(port: int, verify_every: int) -> None:
    runner = web.AppRunner(build_app(Counters(verify_every)), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        addresses: Any = runner.addresses
        announce_ready(f"http://127.0.0.1:{addresses[0][1]}")
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--verify-every", type=int, default=50)
    ns = parser.parse_args()
    asyncio.run(main(ns.port, ns.verify_every))
