"""Growth stops at the policy's limits (issue 12): minutes of traffic with a
subscription disabled in config, one whose endpoint answers 410 (disabled, its
backlog capped), one removed from the config, and batches retired and watched
again. Redis memory and the number of metric series level off; no event is lost
or re-emitted (ids unique per body, every final status delivered).

Long: `pytest -m slow tests/soak/test_growth.py -s` (CALLBRIDGE_GROWTH_SECONDS, 180).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from callbridge.models import Event
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue
from callbridge.store.registry import BatchRegistry
from tests.support.bridge import start_bridge, stop_bridge, write_config
from tests.support.servers import free_port
from tests.support.settings import API_KEY


class Recorder:
    """Keeps one digest per delivered id and the last status per call (small)."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.bodies: dict[str, set[bytes]] = {}
        # Per call, the status of its highest sequence (deliveries may cross).
        self.finals: dict[tuple[str, str], tuple[int, str]] = {}
        self.completed: set[str] = set()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if self.status == 204:
                self.bodies.setdefault(request.headers["webhook-id"], set()).add(
                    hashlib.blake2b(body, digest_size=8).digest()
                )
                doc = orjson.loads(body)
                data = doc["data"]
                if doc["type"] == "batch.completed":
                    self.completed.add(data["batch_id"])
                elif doc["type"] != "call.updated":
                    key = (data["batch_id"], data["call_id"])
                    latest = (data["sequence"], data["status"])
                    self.finals[key] = max(self.finals.get(key, latest), latest)
            return web.Response(status=self.status)

        app = web.Application()
        app.router.add_post("/hook", handle)
        return app


async def series(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_growth_levels_off_at_the_policy_limits(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    seconds = float(os.environ.get("CALLBRIDGE_GROWTH_SECONDS", "180"))
    pool = 8
    sim = Simulator(
        SimulatorConfig(
            api_key=API_KEY,
            seed=7,
            batches=pool,
            calls_per_batch=200,
            concurrency=100,
        )
    )
    upstream = await aiohttp_server(make_app(sim))
    crm, gone = Recorder(), Recorder(status=410)
    crm_hook = await aiohttp_server(crm.app())
    gone_hook = await aiohttp_server(gone.app())
    keys = Keys()
    # A subscription the config no longer names, with what it left behind.
    old_queue = DeliveryQueue(redis_client, keys)
    leftovers = [
        Event.build(
            event_id=f"evt_old_{i}",
            type="call.completed",
            timestamp="2026-11-30T00:00:00.000Z",
            batch_id="sched_old",
            call_id=f"c{i}",
            data={},
        )
        for i in range(200)
    ]
    await old_queue.enqueue("old", [(e, 0) for e in leftovers])
    await redis_client.hset(keys.subscriptions(), "old", int(time.time() * 1000) - 60_000)
    port = free_port()
    path = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(crm_hook.make_url("/hook")),
        sim.batch_ids,
        upstream={"page_size": 100, "max_requests_per_second": 200},
        poller={
            "interval_seconds": 0.5,
            "quiet_period_seconds": 2,
            "linger_interval_seconds": 1,
            "linger_seconds": 2,
            "retired_retention_seconds": 10,
        },
        delivery={
            "retention_seconds": 10,
            "dead_letter_retention_seconds": 10,
            "orphan_retention_seconds": 30,
        },
        server={"port": port},
    )
    config = path.read_text().replace(
        "subscriptions:\n",
        "subscriptions:\n"
        f"- {{name: gone, url: '{gone_hook.make_url('/hook')}', "
        "secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, retry_schedule_seconds: [0.2], "
        "max_backlog: 300}\n"
        f"- {{name: paused, url: '{crm_hook.make_url('/hook')}', enabled: false, "
        "secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw}\n",
    )
    path.write_text(config)
    registry = BatchRegistry(redis_client, keys)
    bridge = await start_bridge(path, log=tmp_path / "bridge.log")
    samples: list[tuple[float, int, int]] = []
    rewatched: set[str] = set()
    added = 0
    started = time.monotonic()
    run = asyncio.create_task(_clock(sim))
    try:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() - started < seconds:
                await asyncio.sleep(5)
                assert bridge.returncode is None, (tmp_path / "bridge.log").read_text()[-2000:]
                for batch_id in sim.batch_ids:
                    reg = await registry.get(batch_id)
                    if reg is not None and reg.retired and batch_id not in rewatched:
                        # Retired with its state still kept: watched again, then let go.
                        rewatched.add(batch_id)
                        await registry.add(batch_id)
                        new_id = f"sched_grow{added:04d}"
                        added += 1
                        sim.add_batch(new_id, 200)
                        await registry.add(new_id)
                used = int((await redis_client.info("memory"))["used_memory"])
                try:
                    n = await series(session, port)
                except aiohttp.ClientError:
                    continue
                samples.append((time.monotonic() - started, used, n))
            # Settle: no new batches; the last ones finish and every delivery is made.
            deadline = time.monotonic() + 180
            while not _all_final_delivered(sim, crm):
                assert time.monotonic() < deadline, _undelivered(sim, crm)
                await asyncio.sleep(1)
    finally:
        run.cancel()
        await stop_bridge(bridge)
    third = max(1, len(samples) // 3)
    middle, last = samples[third : 2 * third], samples[2 * third :]
    mem_mid, mem_last = max(s[1] for s in middle), max(s[1] for s in last)
    ser_mid, ser_last = max(s[2] for s in middle), max(s[2] for s in last)
    depth_gone = await redis_client.zcard(keys.due("gone"))
    print(
        f"\ngrowth: {len(samples)} samples over {samples[-1][0]:.0f}s, {added} batches added, "
        f"{len(rewatched)} re-watched; Redis used_memory {mem_mid / 2**20:.1f} MB (middle third) "
        f"-> {mem_last / 2**20:.1f} MB (last third); metric series {ser_mid} -> {ser_last}; "
        f"'gone' queued {depth_gone} (max_backlog 300); deliveries {len(crm.bodies)}"
    )
    assert mem_last <= mem_mid * 1.25 + 2 * 2**20
    assert ser_last <= ser_mid * 1.1 + 20
    assert depth_gone <= 300
    assert set(await redis_client.hkeys(keys.subscriptions())) == {b"crm", b"gone", b"paused"}
    assert [k async for k in redis_client.scan_iter(match=keys.subscription_pattern("old"))] == []
    assert await redis_client.zcard(keys.due("paused")) == 0
    assert all(len(b) == 1 for b in crm.bodies.values()), "an id was delivered with two bodies"


def _all_final_delivered(sim: Simulator, crm: Recorder) -> bool:
    for batch_id in sim.batch_ids:
        if not sim.is_finished(batch_id):
            return False
        if batch_id not in crm.completed:
            return False
        for call in sim.calls(batch_id):
            if crm.finals.get((batch_id, call["call_id"]), (0, ""))[1] != call["status"]:
                return False
    return True


def _undelivered(sim: Simulator, crm: Recorder) -> str:
    unfinished = [b for b in sim.batch_ids if not sim.is_finished(b)]
    incomplete = [b for b in sim.batch_ids if b not in crm.completed]
    wrong = [
        (b, c["call_id"], c["status"], crm.finals.get((b, c["call_id"])))
        for b in sim.batch_ids
        for c in sim.calls(b)
        if crm.finals.get((b, c["call_id"]), (0, ""))[1] != c["status"]
    ]
    return (
        f"unfinished {unfinished}; no batch.completed {incomplete}; {len(wrong)} calls: {wrong[:5]}"
    )


async def _clock(sim: Simulator) -> None:
    while True:
        await asyncio.sleep(0.25)
        sim.advance()
