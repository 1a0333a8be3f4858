"""``callbridge demo``: the whole product in one process tree, no set-up needed.

It starts the embedded Redis, the platform simulator with one batch, a local
receiver that verifies every delivery's signature as a CRM would, and the bridge
itself; prints the console's URL and token, each verified webhook and a progress
line; and exits 0 once the batch has completed and its ``batch.completed`` event was
delivered (or on Ctrl-C). With `keep_open` the bridge and its console stay up after
that, until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from aiohttp import web

from callbridge.app import RUNNING, Bridge, build_app
from callbridge.config import Settings, parse_settings
from callbridge.deliver.signing import SignatureError, verify
from callbridge.simulator import Simulator, SimulatorConfig, make_app


@dataclass
class DemoReceiver:
    """A CRM-like endpoint: verifies, deduplicates by webhook-id, prints."""

    secret: str
    out: TextIO
    seen: set[str] = field(default_factory=set)
    counts: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/webhooks", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify([self.secret], dict(request.headers), body, now=int(time.time()))
        except SignatureError as exc:
            self.rejected += 1
            print(f"  ✗ rejected a request: {exc}", file=self.out)
            return web.Response(status=400)
        msg_id = request.headers["webhook-id"]
        if msg_id in self.seen:
            return web.Response(status=200)  # a retry of something we already have
        self.seen.add(msg_id)
        event = orjson.loads(body)
        self.counts[event["type"]] += 1
        data = event["data"]
        if event["type"] == "batch.completed":
            print(
                f"  ✓ batch.completed  {data['batch_id']}  counts={data['counts']}", file=self.out
            )
            self.done.set()
        else:
            prev = data.get("previous_status") or "-"
            print(
                f"  ✓ {event['type']:<18} {data['call_id']}  {prev} → {data['status']}"
                f"  seq={data['sequence']}  (signature verified)",
                file=self.out,
            )
        return web.Response(status=204)


# The loggers whose `upstream_anomaly` warnings tell of what the simulator does on
# purpose (redials going back, fields reset to null: see docs/turbulence.md).
_ANOMALY_LOGGERS = (
    "callbridge.poll.cycle_metrics",
    "callbridge.poll.upstream",
    "callbridge.poll.reader",
)


class _QuietOddities(logging.Filter):
    """In the demo the platform's oddities are counted in the summary line instead of
    printed as warnings: the simulator makes them on purpose, and a first look at the
    product should show the flow. Real runs keep the warnings (only the demo installs
    this, and only while it runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "action", None) != "upstream_anomaly"

    def __enter__(self) -> _QuietOddities:
        for name in _ANOMALY_LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in _ANOMALY_LOGGERS:
            logging.getLogger(name).removeFilter(self)


def _oddities(service: Bridge) -> str:
    """The summary line's account of the oddities tolerated (the anomaly counter)."""
    kinds = {
        s.labels["kind"]: int(s.value)
        for family in service.metrics.registry.collect()
        if family.name == "callbridge_upstream_anomalies"
        for s in family.samples
        if s.name.endswith("_total") and s.value
    }
    if not kinds:
        return ""
    listed = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    return (
        f"; {sum(kinds.values())} oddities of the simulated platform tolerated ({listed}:"
        " redials and reset fields it makes on purpose)"
    )


async def _finished(service: Bridge, receiver: DemoReceiver) -> bool:
    """The batch completed and nothing is left to deliver."""
    if not receiver.done.is_set():
        return False
    depth = await service.queue.depths("demo-crm")
    return depth["ready"] + depth["scheduled"] + depth["inflight"] == 0


async def _start_site(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, int(runner.addresses[0][1])


def demo_settings(
    upstream_url: str, hook_url: str, secret: str, token: str, data_dir: str, port: int
) -> Settings:
    return parse_settings(
        {
            "upstream": {
                "base_url": upstream_url,
                "api_key": "sk_demo",
                "max_requests_per_second": 50,
            },
            "redis": {"data_dir": data_dir},
            "poller": {"interval_seconds": 0.5, "jitter_ratio": 0.05},
            "batches": [],
            "subscriptions": [
                {"name": "demo-crm", "url": hook_url, "secret": secret, "events": ["*"]}
            ],
            "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 5},
            "admin": {"token": token},
        },
        env={},
    )


async def run_demo(
    *,
    calls: int = 20,
    step_seconds: float = 0.5,
    port: int = 8080,
    out: TextIO = sys.stdout,
    timeout_s: float = 600,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    keep_open: bool = False,
    seed: int | None = None,
) -> int:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    token = secrets.token_urlsafe(24)
    sim = Simulator(
        SimulatorConfig(
            batches=1,
            calls_per_batch=calls,
            api_key="sk_demo",
            seed=int(time.time()) if seed is None else seed,
        )
    )
    batch_id = sim.batch_ids[0]
    receiver = DemoReceiver(secret, out)
    runners: list[web.AppRunner] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    with tempfile.TemporaryDirectory(prefix="callbridge-demo-") as data_dir, _QuietOddities():
        try:
            sim_runner, sim_port = await _start_site(make_app(sim))
            runners.append(sim_runner)
            hook_runner, hook_port = await _start_site(receiver.app())
            runners.append(hook_runner)
            settings = demo_settings(
                f"http://127.0.0.1:{sim_port}",
                f"http://127.0.0.1:{hook_port}/webhooks",
                secret,
                token,
                data_dir,
                port,
            )
            bridge = build_app(settings, replica_id="demo")
            try:
                bridge_runner, bridge_port = await _start_site(bridge, port)
            except OSError:
                # Port taken: any free port will do for a demo.
                bridge = build_app(settings, replica_id="demo")
                bridge_runner, bridge_port = await _start_site(bridge, 0)
            runners.append(bridge_runner)
            await bridge[RUNNING].operations.add_batch(batch_id)
            base = f"http://127.0.0.1:{bridge_port}"
            info = {"base_url": base, "admin_token": token, "batch_id": batch_id}
            if on_ready is not None:
                on_ready(info)
            print(
                f"callbridge demo: batch {batch_id} with {calls} calls on a simulated platform\n"
                f"  console:   {base}/ui/  (admin token: {token})\n"
                f"  metrics:   {base}/metrics\n"
                f"  admin API: {base}/v1/batches  (Authorization: Bearer {token})\n"
                f"  Ctrl-C to stop"
                + ("." if keep_open else "; --keep-open keeps the console up when done.")
                + "\n",
                file=out,
            )
            started = time.monotonic()
            last_progress = 0.0
            service = bridge[RUNNING]
            while not stop.is_set() and not await _finished(service, receiver):
                if time.monotonic() - started > timeout_s:
                    print("demo timed out", file=out)
                    return 1
                # Let the bridge see the batch once before calls start moving.
                if not sim.is_finished() and (await service.store.load_meta(batch_id)).last_poll_ms:
                    sim.advance()
                now = time.monotonic()
                if now - last_progress >= 3:
                    last_progress = now
                    counts = Counter(c["status"] for c in sim.calls(batch_id))
                    print(
                        f"  … step {sim.step_count}: "
                        + ", ".join(f"{s} {n}" for s, n in sorted(counts.items()))
                        + f" | delivered {sum(receiver.counts.values())}",
                        file=out,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), step_seconds)
            total = sum(receiver.counts.values())
            print(
                f"\ndone: {total} webhooks delivered and verified"
                f" ({', '.join(f'{t} {n}' for t, n in sorted(receiver.counts.items()))}),"
                f" {receiver.rejected} rejected{_oddities(service)}",
                file=out,
            )
            if keep_open and not stop.is_set():
                print(f"console still at {base}/ui/ - Ctrl-C to stop", file=out)
                await stop.wait()
            return 0 if receiver.done.is_set() or stop.is_set() else 1
        finally:
            for r in reversed(runners):
                await r.cleanup()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError):
                    loop.remove_signal_handler(sig)
