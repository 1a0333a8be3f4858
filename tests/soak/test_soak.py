"""Soak: about a million events through one replica; memory stays flat.

Long: run with `pytest -m slow tests/soak` (CALLBRIDGE_SOAK_EVENTS sets the size;
the default is 1,000,000). Prints the figures it measured.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.keys import Keys
from callbridge.store.registry import BatchRegistry
from tests.support.bridge import start_bridge, write_config
from tests.support.settings import API_KEY


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class CountingReceiver:
    """Counts deliveries without keeping them, so the test's own memory stays small."""

    def __init__(self) -> None:
        self.count = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            self.count += 1
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", handle)
        return app


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_soak_one_replica_memory_flat(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    """Batches come and go (a rolling pool, as in production) until `target` events
    were delivered; finished batches retire and their state expires."""
    target = int(os.environ.get("CALLBRIDGE_SOAK_EVENTS", "1000000"))
    pool = 40
    sim = Simulator(
        SimulatorConfig(
            api_key=API_KEY, seed=99, batches=pool, calls_per_batch=1000, concurrency=250
        )
    )
    upstream = await aiohttp_server(make_app(sim))
    receiver = CountingReceiver()
    hook = await aiohttp_server(receiver.app())
    path = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(hook.make_url("/hook")),
        sim.batch_ids,
        upstream={"page_size": 500, "max_requests_per_second": 2000},
        poller={
            "interval_seconds": 1.0,
            "lease_ttl_seconds": 15,
            "max_concurrent_batches": 16,
            "quiet_period_seconds": 2,
            "linger_interval_seconds": 1,
            "linger_seconds": 2,
            "retired_retention_seconds": 5,
        },
        delivery={"retention_seconds": 5, "global_max_in_flight": 64},
    )
    keys = Keys()
    registry = BatchRegistry(redis_client, keys)
    bridge = await start_bridge(path)
    samples: list[tuple[float, int, float, int]] = []
    started = time.monotonic()
    replaced: set[str] = set()
    added = 0
    try:
        last_step = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic() - started
            if now - last_step >= 2.0:
                sim.advance()
                last_step = now
            # Keep the pool full while more events are needed.
            for batch_id in sim.batch_ids:
                if batch_id in replaced or not sim.is_finished(batch_id):
                    continue
                replaced.add(batch_id)
                if receiver.count < target * 0.95:
                    new_id = f"sched_soak{added:05d}"
                    added += 1
                    sim.add_batch(new_id, 1000)
                    await registry.add(new_id)
            used = int((await redis_client.info("memory"))["used_memory"])
            samples.append((now, receiver.count, rss_mb(bridge.pid), used))
            if receiver.count >= target and sim.is_finished():
                due = await redis_client.zcard(keys.due("crm"))
                inflight = await redis_client.zcard(keys.inflight("crm"))
                if due == inflight == 0 and samples[-1][1] == samples[-5][1]:
                    break
        # Delivered records and retired batches expire after their retention (5 s):
        # wait until Redis holds no delivery record any more (bounded).
        deadline = time.monotonic() + 60
        while [k async for k in redis_client.scan_iter(match="*:d:*", count=1000)]:
            assert time.monotonic() < deadline, "delivered records did not expire"
            await asyncio.sleep(0.5)
        redis_end = int((await redis_client.info("memory"))["used_memory"])
    finally:
        bridge.send_signal(signal.SIGTERM)
        await asyncio.wait_for(bridge.wait(), 60)

    delivered = receiver.count
    quarter = next(s for s in samples if s[1] >= delivered // 4)
    rss_quarter, redis_quarter = quarter[2], quarter[3]
    rss_end = max(s[2] for s in samples[-10:])
    print(
        f"\nsoak: {delivered} deliveries from {pool + added} batches in {samples[-1][0]:.0f}s "
        f"({delivered / samples[-1][0]:.0f}/s); bridge RSS {rss_quarter:.0f} MB at 25% -> "
        f"{rss_end:.0f} MB at the end; Redis used_memory {redis_quarter / 2**20:.0f} MB at 25% "
        f"-> {redis_end / 2**20:.0f} MB after the retention"
    )
    assert delivered >= target
    assert bridge.returncode == 0
    # Flat: no growth with the number of events or batches once the working set is built.
    assert rss_end <= rss_quarter * 1.25 + 20
    assert redis_end <= redis_quarter * 1.25
    assert await redis_client.hlen(keys.chain("crm")) == 0
