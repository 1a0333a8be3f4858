"""SIGKILL the bridge at random points while it polls and delivers; restart it;
nothing may be lost and no event id may change its payload."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from service.models import TERMINAL_STATUSES
from service.simulator import FaultConfig, Simulator, SimulatorConfig
from tests.conftest import API_KEY, SECRET, free_port
from tests.receivers import Receiver


async def start_bridge(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "run", "--config", str(config),
        env={**os.environ, "KEY": API_KEY},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


def all_delivered(sim: Simulator, receiver: Receiver) -> bool:
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    batches_done: set[str] = set()
    for r in receiver.delivered:
        p = r.payload()
        if p["type"] == "batch.completed":
            batches_done.add(p["data"]["batch_id"])
        else:
            seen[(p["data"]["batch_id"], p["data"]["call_id"])].add(p["data"]["status"])
    if batches_done != set(sim.batch_ids):
        return False
    return all(
        sim.history(b, c["call_id"])[-1][1] in seen[(b, c["call_id"])]
        for b in sim.batch_ids
        for c in sim.calls(b)
    )


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
    upstream = await aiohttp_server(sim.make_app())
    receiver = Receiver()
    receiver.answers.extend([500, 500, 503])  # a few failed attempts to retry across crashes
    hook = await aiohttp_server(receiver.app())
    config = {
        "upstream": {
            "base_url": str(upstream.make_url("")),
            "api_key": "${KEY}",
            "page_size": 10,
            "max_requests_per_second": 500,
            "backoff_max_seconds": 0.05,
        },
        "redis": {"url": redis_url},
        "poller": {"interval_seconds": 0.1, "lease_ttl_seconds": 2, "jitter_ratio": 0},
        "batches": [{"id": b} for b in sim.batch_ids],
        "subscriptions": [
            {
                "name": "crm",
                "url": str(hook.make_url("/hook")),
                "secret": SECRET,
                "timeout_seconds": 2,
                "retry_schedule_seconds": [0.2] * 20,
            }
        ],
        "delivery": {"visibility_margin_seconds": 1, "idle_poll_seconds": 0.05},
        "server": {"host": "127.0.0.1", "port": free_port(), "shutdown_grace_seconds": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

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
        for _ in range(600):
            if all_delivered(sim, receiver):
                break
            await asyncio.wait_for(receiver.arrived.wait(), 30)
            receiver.arrived.clear()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)

    assert kills >= 4
    assert all_delivered(sim, receiver)
    receiver.verify_all(SECRET)
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for r in receiver.received:
        bodies[r.id].add(r.body)
    assert all(len(b) == 1 for b in bodies.values()), "an event id changed its payload"
    # What was reported for each call is what the call really went through, in order.
    for r in receiver.delivered:
        p = r.payload()
        if p["type"] == "batch.completed" or p["type"] == "call.updated":
            continue
        truth = [s for _, s in sim.history(p["data"]["batch_id"], p["data"]["call_id"])]
        assert p["data"]["status"] in truth
    terminal = sum(
        1
        for r in receiver.delivered
        if r.payload()["data"].get("status") in TERMINAL_STATUSES
        and r.payload()["type"].startswith("call.")
    )
    assert terminal >= 80
