"""A CRM that goes away mid-campaign and comes back (issue 25): the real bridge (a
`callbridge run` subprocess, default breaker and retry settings) against the simulator,
judged by the ground-truth checker; every event the CRM missed must arrive within 15 s
of its return, whatever kind of outage and however long.

    pytest -m slow tests/integration/test_outage_recovery.py -s    # 10 s, 60 s, 10 min

(A minute each at least: the default suite has the catch-up bound in the turbulence
tests' scenario E, whose CRM refuses connections until the breaker has opened.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from callbridge.simulator import Simulator, SimulatorConfig, Timing, make_app, run_clock
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue
from tests.support.flaky import FlakyReceiver
from tests.support.replicas import Replica
from tests.support.scenario import PLATFORM_FAULTS, Scenario, serve_on, wait_until, write_config
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET
from tests.support.turbulence import check
from tests.support.watch import FleetWatch

CATCH_UP_S = 15.0


async def run_outage(
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
    *,
    kind: str,
    outage_s: float,
    calls: int = 600,
) -> None:
    clock = time.monotonic
    wall_offset = time.time() - clock()  # event timestamps are wall-clock
    sim = Simulator(
        SimulatorConfig(
            api_key=API_KEY,
            seed=21,
            batches=2,
            calls_per_batch=calls,
            concurrency=calls // 2,
            redial_probability=0.5,
            faults=PLATFORM_FAULTS,
            record_served=True,
            # Slow enough that the campaign outlasts the outage on both sides.
            timing=Timing(step_seconds=max(0.1, (outage_s + 30) / 300)),
        ),
        clock=clock,
    )
    upstream = await serve_on(make_app(sim), free_port())
    port = free_port()
    receiver = FlakyReceiver(SECRET, fail_share=0.2, kinds=("500", "429"), weights=(1, 1))
    hook: Any = await serve_on(receiver.app(), port)
    config = write_config(
        tmp_path / "config.yaml",
        f"http://127.0.0.1:{upstream.addresses[0][1]}",
        redis_url,
        f"http://127.0.0.1:{port}/hook",
        Scenario("outage", subscription={"timeout_seconds": 5}),
        sim.batch_ids,
    )
    replica = Replica(config, tmp_path / "replica.log")
    watch = FleetWatch()
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        await replica.start()
        tasks: list[asyncio.Task[Any]] = []
        try:
            await replica.wait_healthy(session)
            started = clock()
            tasks = [
                asyncio.create_task(run_clock(sim, sim.config.timing.step_seconds, stop)),
                asyncio.create_task(watch.run([replica], session, started)),
            ]
            await asyncio.sleep(8)  # the campaign under way, deliveries flowing
            down_at = clock()
            if kind == "refused":
                await hook.cleanup()
            else:
                receiver.unavailable = True
            await asyncio.sleep(outage_s)
            if kind == "refused":
                hook = await serve_on(receiver.app(), port)
            else:
                receiver.unavailable = False
            back_at = clock()
            assert await wait_until(sim.is_finished, 600)
            stop.set()
            queue = DeliveryQueue(redis_client, Keys())
            assert await _settled(queue, receiver, len(sim.batch_ids), 180)
        finally:
            stop.set()
            await replica.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await hook.cleanup()
            await upstream.cleanup()
    now = clock()
    # The rule of the turbulence tests: every final status, and every status the platform
    # served to the bridge twice, must arrive.
    report = check(
        sim.spans(),
        receiver.requests,
        poll_interval_s=1.0,
        outages=sim.outages(now),
        now=now,
        served=sim.served,
    )
    # Missed: committed before the CRM came back, first delivered after it.
    late = receiver.caught_up_after(back_at, wall_offset)
    worst = late[-1] if late else 0.0
    print(
        f"== {kind} outage of {outage_s:.0f}s ({down_at - started:.0f}s in): {len(late)} "
        f"missed events, caught up in {worst:.1f}s (p50 "
        f"{late[len(late) // 2] if late else 0:.1f}s) after the return\n{report}\n"
        f"fleet: {watch.figures()}\nreceiver: {receiver.figures()}"
    )
    assert report.required > 3 * calls, str(report)
    assert report.missing == [], str(report)
    assert not report.undelivered_ids
    assert not report.two_bodies
    assert report.batch_completed_exact, str(report)
    assert len(late) > calls // 3  # the outage did hold events back
    assert worst <= CATCH_UP_S, late[-10:]


async def _settled(
    queue: DeliveryQueue, receiver: FlakyReceiver, batches: int, within_s: float
) -> bool:
    """Every batch completed at the receiver and nothing left in the bridge's queue."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        done = {r.payload()["data"]["batch_id"] for r in receiver.delivered
                if r.payload()["type"] == "batch.completed"}  # fmt: skip
        depths = await queue.depths("crm")
        if len(done) == batches and not any(n for s, n in depths.items() if s != "dead"):
            return True
        await asyncio.sleep(0.5)
    return False


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["refused", "503"])
async def test_a_short_outage_is_caught_up_within_seconds(
    kind: str, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await run_outage(tmp_path, redis_url, redis_client, kind=kind, outage_s=10, calls=300)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["refused", "503"])
async def test_a_minute_long_outage_is_caught_up_within_15s(
    kind: str, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await run_outage(tmp_path, redis_url, redis_client, kind=kind, outage_s=60)


@pytest.mark.slow
@pytest.mark.timeout(1500)
async def test_a_ten_minute_outage_is_caught_up_within_15s(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    await run_outage(tmp_path, redis_url, redis_client, kind="refused", outage_s=600)
