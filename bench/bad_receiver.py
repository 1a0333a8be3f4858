"""A webhook receiver on its bad days, in its own process (for `bench.bad_days`).

``python -m bench.bad_receiver --port 0 [options]`` serves two HTTP servers:

* the **hook** server, ``POST /hook``: the CRM. It verifies the Standard Webhooks
  signature of every request (`callbridge.deliver.signing.verify`; a bad one is
  answered 400 and never counts as delivered), then answers as configured:

  - ``--fail-share S --fail-kinds hang=2,500=5``: a share of first attempts fail, which
    ones and how decided by the webhook id and ``--seed`` alone
    (`tests.support.flaky.FlakyReceiver.first_attempt_fails`, so both runs of a
    comparison fail the same ids). A ``hang`` answers 500 after ``--hang-seconds`` (past
    the sender's timeout); ``429`` carries ``Retry-After: 1``. Later attempts succeed.
    An attempt is any request of that id that reached this server, including one
    answered 503 during an outage;
  - ``--capacity N --service-ms T``: at most N requests are served at once, each in T
    ms; the rest wait in arrival order (an asyncio semaphore: FIFO), so latency grows
    with the queue, as a server with N workers does;
  - an **outage** (``POST /_outage`` on the control server): ``refuse`` closes the
    listening socket and every open connection, and listens again on the same port
    after the given seconds; ``503`` answers every request 503 meanwhile.

* the **control** server (its URL is the ``READY`` line), which never goes down:
  ``GET /_info`` (``hook_url``, ``ops_url``); ``GET /_stats``; ``GET /_events`` (per
  webhook id answered 2xx, the first: ``[received, type, batch_id, call_id, status,
  timestamp]``, as `bench.receiver`); ``GET /_hooks`` (``[id, received, doc]``, what the
  ground-truth checker reads, as `bench.receiver`); ``GET /_requests?since=T`` (every
  request: ``[arrival, answered, answer, attempt, id, in_service_or_queued]``);
  ``POST /_outage?mode=refuse|503&seconds=S`` and ``GET /_outage`` (the windows as
  ``[mode, start, end]``, end once it is back); ``POST /ops`` (an on-call endpoint:
  operational events, verified, ``GET /_ops`` lists them).

Every time is ``time.time()``, the clock the other benchmark processes stamp with.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

import orjson
from aiohttp import web

from bench.common import SECRET, announce_ready
from bench.receiver import _checked
from callbridge.deliver.signing import SignatureError, verify
from tests.support.flaky import FlakyReceiver

# Handlers still running when an outage closes the hook server are cut after this.
_SHUTDOWN_S = 0.2


class Receiver:
    """What the hook server does and what it saw."""

    def __init__(self, ns: argparse.Namespace) -> None:
        kinds = dict(part.split("=") for part in ns.fail_kinds.split(",") if part)
        self.flaky = FlakyReceiver(
            SECRET,
            fail_share=ns.fail_share,
            kinds=tuple(kinds),
            weights=tuple(float(w) for w in kinds.values()),
            hang_seconds=ns.hang_seconds,
            seed=ns.seed,
        )
        self.hang_s = ns.hang_seconds
        self.capacity = asyncio.Semaphore(ns.capacity) if ns.capacity > 0 else None
        self.service_s = ns.service_ms / 1000
        self.attempts: dict[str, int] = {}
        self.delivered: set[str] = set()
        # [arrival, answered, answer, attempt, id, in service or queued at arrival]
        self.requests: list[list[Any]] = []
        self.events: list[list[Any]] = []
        self.hooks: list[list[Any]] = []
        self.bad_signatures = 0
        self.busy = 0
        self.down: str | None = None  # the outage mode while one runs
        self.outages: list[list[Any]] = []
        self.ops: list[list[Any]] = []
        self.ops_bad_signatures = 0

    async def hook(self, request: web.Request) -> web.Response:
        arrival = time.time()
        body = await request.read()
        event_id = request.headers.get("webhook-id", "")
        attempt = self.attempts.get(event_id, 0) + 1
        self.attempts[event_id] = attempt
        row: list[Any] = [arrival, 0.0, "", attempt, event_id, self.busy]
        self.requests.append(row)
        self.busy += 1
        try:
            return await self._answer(request, body, event_id, attempt, row)
        finally:
            self.busy -= 1
            row[1] = time.time()

    async def _answer(
        self, request: web.Request, body: bytes, event_id: str, attempt: int, row: list[Any]
    ) -> web.Response:
        try:
            verify([SECRET], request.headers, body, now=int(time.time()))
        except SignatureError:
            self.bad_signatures += 1
            row[2] = "400"
            return web.Response(status=400, text="bad signature")
        if self.down == "503":
            row[2] = "503"
            return web.Response(status=503, text="down for maintenance")
        answer = (self.flaky.first_attempt_fails(event_id) if attempt == 1 else None) or "200"
        row[2] = answer
        if self.capacity is not None:
            async with self.capacity:
                await asyncio.sleep(self.service_s)
        if answer == "hang":
            await asyncio.sleep(self.hang_s)
            return web.Response(status=500, text="too late")
        if answer == "429":
            return web.Response(status=429, text="slow down", headers={"Retry-After": "1"})
        if answer != "200":
            return web.Response(status=int(answer), text="nope")
        if event_id not in self.delivered:
            self.delivered.add(event_id)
            doc = orjson.loads(body)
            data = doc.get("data") or {}
            received = row[0]
            self.events.append(
                [
                    received,
                    doc.get("type"),
                    data.get("batch_id"),
                    data.get("call_id"),
                    data.get("status"),
                    doc.get("timestamp"),
                ]
            )
            self.hooks.append([event_id, received, _checked(doc)])
        return web.Response(status=200, text="ok")

    def stats(self) -> dict[str, Any]:
        answers: dict[str, int] = {}
        for row in self.requests:
            answers[row[2]] = answers.get(row[2], 0) + 1
        return {
            "requests": len(self.requests),
            "ids": len(self.attempts),
            "delivered_ids": len(self.delivered),
            "answers": answers,
            "bad_signatures": self.bad_signatures,
            "busy": self.busy,
            "down": self.down,
            "ops": len(self.ops),
            "ops_bad_signatures": self.ops_bad_signatures,
        }


class HookServer:
    """The hook app on a fixed port, which an outage can take down and bring back."""

    def __init__(self, receiver: Receiver, port: int) -> None:
        self.receiver = receiver
        self.port = port
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.receiver.hook)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_S)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        addresses: Any = runner.addresses
        self.port = addresses[0][1]
        self.runner = runner

    async def stop(self) -> None:
        """Stop listening and close every connection (refused from now on)."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()

    async def outage(self, mode: str, seconds: float, window: list[Any]) -> None:
        receiver = self.receiver
        receiver.down = mode
        if mode == "refuse":
            await self.stop()
        try:
            await asyncio.sleep(max(0.0, window[1] + seconds - time.time()))
        finally:
            if mode == "refuse":
                await self.start()
            receiver.down = None
            window[2] = time.time()


def control_app(receiver: Receiver, hook: HookServer, control_url: list[str]) -> web.Application:
    tasks: set[asyncio.Task[None]] = set()

    def raw(doc: Any) -> web.Response:
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def info(request: web.Request) -> web.Response:
        return raw(
            {
                "hook_url": f"http://127.0.0.1:{hook.port}/hook",
                "ops_url": control_url[0] + "/ops",
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return raw(receiver.stats())

    async def events(request: web.Request) -> web.Response:
        return raw(receiver.events)

    async def hooks(request: web.Request) -> web.Response:
        return raw(receiver.hooks)

    async def requests(request: web.Request) -> web.Response:
        since = float(request.query.get("since", "0"))
        return raw([r for r in receiver.requests if r[0] >= since])

    async def outage_start(request: web.Request) -> web.Response:
        if receiver.down is not None:
            raise web.HTTPConflict(text="an outage is under way")
        mode = request.query["mode"]
        if mode not in ("refuse", "503"):
            raise web.HTTPBadRequest(text="mode must be refuse or 503")
        seconds = float(request.query["seconds"])
        window: list[Any] = [mode, time.time(), None]
        receiver.outages.append(window)
        task = asyncio.create_task(hook.outage(mode, seconds, window))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return raw({"mode": mode, "start": window[1], "planned_end": window[1] + seconds})

    async def outages(request: web.Request) -> web.Response:
        return raw(receiver.outages)

    async def ops(request: web.Request) -> web.Response:
        body = await request.read()
        received = time.time()
        try:
            verify([SECRET], request.headers, body, now=int(received))
            verified = True
        except SignatureError:
            receiver.ops_bad_signatures += 1
            verified = False
        doc = orjson.loads(body)
        receiver.ops.append([received, doc.get("type"), doc.get("data"), verified])
        return web.Response(status=200 if verified else 400)

    async def ops_list(request: web.Request) -> web.Response:
        return raw(receiver.ops)

    app = web.Application()
    app.router.add_get("/_info", info)
    app.router.add_get("/_stats", stats)
    app.router.add_get("/_events", events)
    app.router.add_get("/_hooks", hooks)
    app.router.add_get("/_requests", requests)
    app.router.add_post("/_outage", outage_start)
    app.router.add_get("/_outage", outages)
    app.router.add_post("/ops", ops)
    app.router.add_get("/_ops", ops_list)
    return app


async def main(ns: argparse.Namespace) -> None:
    receiver = Receiver(ns)
    hook = HookServer(receiver, 0)
    await hook.start()
    control_url = [""]
    runner = web.AppRunner(control_app(receiver, hook, control_url), access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", ns.port).start()
        addresses: Any = runner.addresses
        control_url[0] = f"http://127.0.0.1:{addresses[0][1]}"
        announce_ready(control_url[0])
        await stop.wait()
    finally:
        await runner.cleanup()
        await hook.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="the control server's port")
    parser.add_argument("--fail-share", type=float, default=0.0)
    parser.add_argument("--fail-kinds", default="500=1", help="kind=weight,... of 500, 429, hang")
    parser.add_argument("--hang-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--capacity", type=int, default=0, help="requests served at once (0: all)")
    parser.add_argument("--service-ms", type=float, default=0.0)
    asyncio.run(main(parser.parse_args()))
