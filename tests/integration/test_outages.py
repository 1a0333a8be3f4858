"""Outages that really happen: Redis restarts, a subscriber down for a long stretch,
an upstream that misbehaves in every documented way for a while."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.app import Bridge
from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from tests.support.bridge import (
    check_consistency,
    final_statuses_delivered,
    start_bridge,
    wait_until_delivered,
    write_config,
)
from tests.support.metrics import sample
from tests.support.receivers import Receiver
from tests.support.servers import free_port, start_server
from tests.support.settings import API_KEY, SECRET, make_settings


@pytest.mark.timeout(120)
async def test_redis_restart_mid_run_loses_nothing(tmp_path: Path, aiohttp_server: Any) -> None:
    port = free_port()
    data = tmp_path / "redis"
    server = await asyncio.to_thread(start_server, data, port)
    sim = Simulator(
        SimulatorConfig(api_key=API_KEY, seed=21, batches=2, calls_per_batch=40, concurrency=5)
    )
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    path = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        f"redis://127.0.0.1:{port}/0",
        str(hook.make_url("/hook")),
        sim.batch_ids,
    )
    bridge = await start_bridge(path)
    restarts = 0
    try:
        elapsed, next_restart = 0.0, 1.5
        while not sim.is_finished():
            await asyncio.sleep(0.1)
            elapsed += 0.1
            sim.advance()
            if elapsed >= next_restart and restarts < 2:
                # A clean restart (SIGTERM flushes the AOF), then a short outage.
                server.send_signal(signal.SIGTERM)
                await asyncio.to_thread(server.wait, 10)
                await asyncio.sleep(0.5)
                server = await asyncio.to_thread(start_server, data, port)
                restarts += 1
                next_restart = elapsed + 2.0
        await wait_until_delivered(sim, receiver)
        assert bridge.returncode is None, "the bridge must survive Redis restarts"
    finally:
        bridge.send_signal(signal.SIGTERM)
        await asyncio.wait_for(bridge.wait(), 30)
        server.terminate()
        await asyncio.to_thread(server.wait, 10)
    assert restarts == 2
    assert final_statuses_delivered(sim, receiver)
    check_consistency(sim, receiver)


async def test_subscriber_down_for_long_then_back_gets_everything(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=3, batches=2, calls_per_batch=20))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver(default=500)
    hook = await aiohttp_server(receiver.app())
    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[
            {
                "name": "crm",
                "url": str(hook.make_url("/hook")),
                "secret": SECRET,
                "retry_schedule_seconds": [0] * 8,
                "max_in_flight": 4,
            }
        ],
        delivery={"breaker_min_attempts": 3, "breaker_cooloff_seconds": 3600},
    )
    svc = await Bridge.create(settings, replica_id="t")
    try:
        while not sim.is_finished():
            for b in sim.batch_ids:
                await svc.poller.poll_once(b)
            await svc.deliverer.drain()
            sim.advance()
        for b in sim.batch_ids:
            await svc.poller.poll_once(b)
        await svc.deliverer.drain()
        # Down the whole time: the breaker kept the attempts low and nothing was dropped.
        # (at most the requests in flight when it opened, then nothing)
        assert len(receiver.received) <= 4 + 3
        depth = await svc.queue.depths("crm")
        queued = depth["ready"] + depth["scheduled"] + depth["waiting"]
        assert queued > 100
        assert depth["dead"] == 0
        # Back up; the operator (or the next successful probe) closes the breaker.
        receiver.default = 200
        await svc.operations.enable("crm")
        await svc.deliverer.drain()
    finally:
        await svc.close()
    assert final_statuses_delivered(sim, receiver)
    ids = [r.id for r in receiver.delivered]
    assert len(ids) == len(set(ids)) == queued
    # Per call, the first attempts went out in sequence order.
    first_seen: dict[tuple[str, str], list[int]] = {}
    for r in receiver.received:
        d = r.payload()["data"]
        if "call_id" in d:
            seqs = first_seen.setdefault((d["batch_id"], d["call_id"]), [])
            if d["sequence"] not in seqs:
                seqs.append(d["sequence"])
    assert all(s == sorted(s) for s in first_seen.values())


async def test_upstream_misbehaving_then_recovering(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=17, batches=2, calls_per_batch=25))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[{"name": "crm", "url": str(hook.make_url("/hook")), "secret": SECRET}],
        upstream={"page_size": 6, "timeout_seconds": 0.2, "max_attempts": 2},
    )
    phases = [
        FaultConfig(rate_limit_ratio=0.9, retry_after_seconds=0),  # a 429 storm
        FaultConfig(server_error_ratio=0.7),
        FaultConfig(slow_ratio=0.5, slow_seconds=0.5),  # hangs past the timeout
        FaultConfig(malformed_ratio=0.7),
        FaultConfig(auth_fail=True),  # the key rejected for a while
        FaultConfig(shift_ratio=0.5),
        FaultConfig(),
    ]
    svc = await Bridge.create(settings, replica_id="t")
    try:
        step = 0
        while not sim.is_finished() or step < 3 * len(phases):
            sim.faults = phases[(step // 3) % len(phases)] if step < 3 * len(phases) else phases[-1]
            for b in sim.batch_ids:
                await svc.poller.poll_once(b)
            sim.advance()
            step += 1
        sim.faults = FaultConfig()
        for b in sim.batch_ids:
            await svc.poller.poll_once(b)
        await svc.deliverer.drain()
        m = svc.metrics
        # Metrics show what happened.
        for outcome, code in [
            ("rate_limited", "429"),
            ("auth_error", "401"),
            ("timeout", "none"),
        ]:
            assert (sample(m, "upstream_requests_total", outcome=outcome, code=code) or 0) > 0, (
                outcome
            )
        assert (sample(m, "poll_cycles_total", batch=sim.batch_ids[0], outcome="failed") or 0) > 0
        assert (
            sample(m, "poll_cycles_total", batch=sim.batch_ids[0], outcome="auth_failed") or 0
        ) > 0
        # Recovered without operator action.
        assert svc.poller.reach.auth_ok
        assert sample(m, "upstream_auth_ok") == 1
    finally:
        await svc.close()
    # No false events: every reported status is one the call had, and the ends arrived.
    check_consistency(sim, receiver)
    assert final_statuses_delivered(sim, receiver)
