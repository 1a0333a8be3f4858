"""The running service: HTTP surface, metrics, admin API, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from callbridge.app import RUNNING, build_app
from callbridge.config import Settings
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from tests.support.metrics import sample
from tests.support.receivers import Receiver
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET, make_settings

TOKEN = "admin-token-0123456789"

EXPECTED_METRICS = {
    "callbridge_upstream_requests",
    "callbridge_upstream_request_duration_seconds",
    "callbridge_poll_cycles",
    "callbridge_poll_cycle_duration_seconds",
    "callbridge_calls",
    "callbridge_transitions",
    "callbridge_events",
    "callbridge_delivery_attempts",
    "callbridge_delivery_duration_seconds",
    "callbridge_delivery_lag_seconds",
    "callbridge_queue_depth",
    "callbridge_dead_letters",
    "callbridge_subscription_disabled",
    "callbridge_subscription_breaker_open",
    "callbridge_batch_leases_held",
    "callbridge_embedded_redis",
    "callbridge_upstream_auth_ok",
    "callbridge_redis_persistence_ok",
    "callbridge_batch_poll_interval_seconds",
    "callbridge_upstream_anomalies",
}


@pytest.fixture
async def running(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any, aiohttp_client: Any
) -> tuple[TestClient[Any, Any], Simulator, Receiver, Settings]:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=5, calls_per_batch=10))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[
            {"name": "crm", "url": str(hook.make_url("/hook?token=s3cr3t")), "secret": SECRET}
        ],
        admin={"token": TOKEN},
    )
    client = await aiohttp_client(build_app(settings, replica_id="t"))
    return client, sim, receiver, settings


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def test_health_ready_and_metrics(running: Any) -> None:
    client, sim, _, _ = running
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
    svc = client.app[RUNNING]
    await svc.poller.poll_once(sim.batch_ids[0])
    sim.advance(5)
    await svc.poller.poll_once(sim.batch_ids[0])
    await svc.deliverer.drain()
    text = await (await client.get("/metrics")).text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names >= EXPECTED_METRICS, EXPECTED_METRICS - names


async def test_admin_api_requires_token(running: Any) -> None:
    client, sim, _, _ = running
    for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxx"}, {"Authorization": TOKEN}):
        resp = await client.get("/v1/batches", headers=headers)
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["code"] == "UNAUTHORIZED"
    resp = await client.get("/v1/batches", headers=auth())
    assert resp.status == 200
    assert [b["id"] for b in (await resp.json())["data"]] == sim.batch_ids


async def test_admin_batches_and_subscriptions(running: Any) -> None:
    client, _, _, _ = running
    resp = await client.post("/v1/batches", json={"id": "sched_new"}, headers=auth())
    assert resp.status == 201
    assert (await client.post("/v1/batches", json={"id": "bad id"}, headers=auth())).status == 400
    assert (await client.post("/v1/batches", json={"id": ".."}, headers=auth())).status == 400
    assert (await client.post("/v1/batches", data=b"nope", headers=auth())).status == 400
    assert (await client.delete("/v1/batches/sched_new", headers=auth())).status == 200
    assert (await client.delete("/v1/batches/sched_new", headers=auth())).status == 404
    subs = (await (await client.get("/v1/subscriptions", headers=auth())).json())["data"]
    assert subs[0]["name"] == "crm"
    # URLs often carry capability tokens: userinfo and query values are never shown.
    assert subs[0]["url"].endswith("/hook?token=***")
    assert "s3cr3t" not in str(subs)
    assert set(subs[0]["queue"]) == {"ready", "scheduled", "inflight", "dead", "waiting"}
    assert (await client.post("/v1/subscriptions/nope/enable", headers=auth())).status == 404
    assert (await client.post("/v1/subscriptions/crm/enable", headers=auth())).status == 200
    dl = await client.get("/v1/subscriptions/crm/dead-letters", headers=auth())
    assert (await dl.json())["data"]["items"] == []
    assert (await client.post("/v1/events/evt_nope/redeliver", headers=auth())).status == 404


async def test_admin_api_off_without_token(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_client: Any
) -> None:
    settings = make_settings("http://127.0.0.1:1", redis_url)
    client = await aiohttp_client(build_app(settings, replica_id="t"))
    assert (await client.get("/v1/batches", headers=auth())).status == 404


async def test_sigterm_drains_and_exits_zero(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=9, calls_per_batch=20))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    port = free_port()
    config = {
        "upstream": {"base_url": str(upstream.make_url("")), "api_key": "${KEY}"},
        "redis": {"url": redis_url},
        "poller": {"interval_seconds": 0.2},
        "batches": [{"id": b} for b in sim.batch_ids],
        "subscriptions": [{"name": "crm", "url": str(hook.make_url("/hook")), "secret": SECRET}],
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_seconds": 5},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    sim.advance(6)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbridge", "run", "--config", str(path),
        env={**os.environ, "KEY": API_KEY},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    # Wait until the first deliveries arrived: the bridge is polling and delivering.
    await asyncio.wait_for(receiver.arrived.wait(), 30)
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()[-2000:]
    # Nothing stuck in flight, nothing lost: what is left is due for the next start.
    from callbridge.store.keys import Keys

    assert await redis_client.zcard(Keys().inflight("crm")) == 0
    lease = await redis_client.get(Keys().lease(sim.batch_ids[0]))
    assert lease is None  # handed back on the way out


async def test_redis_durability_is_checked(running: Any, redis_client: aioredis.Redis) -> None:
    client, _, _, _ = running
    svc = client.app[RUNNING]
    assert sample(svc.metrics, "redis_persistence_ok") == 1
    await redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        await svc.check_redis()
        assert sample(svc.metrics, "redis_persistence_ok") == 0
    finally:
        await redis_client.config_set("maxmemory-policy", "noeviction")


async def test_liveness_fails_when_a_loop_is_stuck(running: Any) -> None:
    client, _, _, _ = running
    svc = client.app[RUNNING]
    assert svc.alive() == (True, "ok")
    ok, why = svc.alive(now=time.monotonic() + 120)
    assert not ok
    assert "has not run" in why


async def test_a_replay_naming_more_than_a_thousand_ids_is_refused(running: Any) -> None:
    client, _, _, _ = running
    ids = [f"evt_{i}" for i in range(1001)]
    resp = await client.post(
        "/v1/subscriptions/crm/dead-letters/replay", json={"ids": ids}, headers=auth()
    )
    assert resp.status == 400
    assert "at most 1000 ids" in (await resp.json())["message"]
    resp = await client.post(
        "/v1/subscriptions/crm/dead-letters/replay", json={"ids": ids[:1000]}, headers=auth()
    )
    assert resp.status == 200
