"""SIGKILL the bridge at random points while it polls and delivers; restart it;
nothing may be lost and no event id may change its payload."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.models import TERMINAL_STATUSES
from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from tests.support.bridge import (
    check_consistency,
    final_statuses_delivered,
    start_bridge,
    wait_until_delivered,
    write_config,
)
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY


@pytest.mark.timeout(150)
async def test_sigkill_at_random_points_loses_nothing(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    rng = random.Random(20261128)
    sim = Simulator(
        SimulatorConfig(
            api_key=API_KEY,
            seed=4,
            batches=2,
            calls_per_batch=40,
            faults=FaultConfig(shift_ratio=0.05, server_error_ratio=0.02),
        )
    )
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    receiver.answers.extend([500, 500, 503])  # a few failed attempts to retry across crashes
    hook = await aiohttp_server(receiver.app())
    path = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(hook.make_url("/hook")),
        sim.batch_ids,
    )

    kills = 0
    proc = await start_bridge(path)
    try:
        # Pace the simulated world (a step every 100 ms) and kill the bridge at random.
        kill_at = rng.uniform(0.5, 2.0)
        elapsed = 0.0
        while not sim.is_finished():
            await asyncio.sleep(0.1)
            elapsed += 0.1
            sim.advance()
            if elapsed >= kill_at:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                kills += 1
                proc = await start_bridge(path)
                kill_at = elapsed + rng.uniform(0.5, 2.0)
        # One more kill after the world stopped, while deliveries are still going.
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        kills += 1
        proc = await start_bridge(path)
        await wait_until_delivered(sim, receiver)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)

    assert kills >= 4
    assert final_statuses_delivered(sim, receiver)
    check_consistency(sim, receiver)
    terminal = sum(
        1
        for r in receiver.delivered
        if r.payload()["data"].get("status") in TERMINAL_STATUSES
        and r.payload()["type"].startswith("call.")
    )
    assert terminal >= 80
