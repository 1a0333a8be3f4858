"""Three replicas against one Redis; a random one is SIGKILLed and restarted again
and again for a whole batch lifecycle. Every final status reaches the receiver,
no id changes payload, no transition is emitted twice."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from callbridge.store.keys import Keys
from tests.support.bridge import (
    check_consistency,
    final_statuses_delivered,
    start_bridge,
    wait_until_delivered,
    write_config,
)
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY


@pytest.mark.timeout(170)
async def test_three_replicas_with_random_kills(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    rng = random.Random(7)
    sim = Simulator(
        SimulatorConfig(
            api_key=API_KEY,
            seed=8,
            batches=6,
            calls_per_batch=40,
            concurrency=5,
            faults=FaultConfig(shift_ratio=0.03),
        )
    )
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    path = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(hook.make_url("/hook")),
        sim.batch_ids,
    )
    procs = [await start_bridge(path) for _ in range(3)]
    kills = 0
    owners_seen: set[str] = set()
    try:
        elapsed, next_kill = 0.0, 1.5
        while not sim.is_finished():
            await asyncio.sleep(0.15)
            elapsed += 0.15
            sim.advance()
            for b in sim.batch_ids:
                owner = await redis_client.get(Keys().lease(b))
                if owner:
                    owners_seen.add(owner.decode().rsplit(":", 1)[0])
            if elapsed >= next_kill:
                victim = rng.randrange(len(procs))
                procs[victim].send_signal(signal.SIGKILL)
                await procs[victim].wait()
                kills += 1
                procs[victim] = await start_bridge(path)
                next_kill = elapsed + rng.uniform(1.0, 2.5)
        await wait_until_delivered(sim, receiver)
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 30)

    assert kills >= 3
    # Work was spread: more than one replica owned batches.
    assert len(owners_seen) >= 2
    assert final_statuses_delivered(sim, receiver)
    check_consistency(sim, receiver)
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
