"""What the console reads and how it is served, over HTTP without a browser."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from callbridge.api.console import SECURITY_HEADERS, static_files
from callbridge.app import RUNNING, build_app
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from tests.support.bridge import pause_loops
from tests.support.receivers import Receiver
from tests.support.settings import API_KEY, SECRET, make_settings

TOKEN = "console-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def running(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any, aiohttp_client: Any
) -> tuple[TestClient[Any, Any], Simulator]:
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=3, calls_per_batch=30))
    upstream = await aiohttp_server(make_app(sim))
    ok, refusing = Receiver(), Receiver(default=500)
    hooks = [await aiohttp_server(r.app()) for r in (ok, refusing)]
    settings = make_settings(
        str(upstream.make_url("")),
        redis_url,
        batches=sim.batch_ids,
        subscriptions=[
            {"name": "crm", "url": str(hooks[0].make_url("/hook")), "secret": SECRET},
            {
                "name": "refusing",
                "url": str(hooks[1].make_url("/hook")),
                "secret": SECRET,
                "retry_schedule_seconds": [],
                # All claimed at once: every one dead before the breaker opens.
                "adaptive_concurrency": False,
            },
        ],
        admin={"token": TOKEN},
        delivery={"breaker_min_attempts": 3, "breaker_cooloff_seconds": 60},
    )
    client = await aiohttp_client(build_app(settings, replica_id="t"))
    bridge = client.app[RUNNING]
    await pause_loops(bridge)
    sim.advance(4)
    await bridge.poller.poll_once(sim.batch_ids[0])
    await bridge.deliverer.drain()
    return client, sim


async def data(client: TestClient[Any, Any], path: str) -> Any:
    resp = await client.get(path, headers=AUTH)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["data"]


async def test_console_is_served_with_strict_headers(running: Any) -> None:
    client, _ = running
    resp = await client.get("/ui", allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (302, "/ui/")
    for name, (body, kind) in {"": static_files()["index.html"], **static_files()}.items():
        if name == "index.html":
            continue  # served as /ui/
        resp = await client.get(f"/ui/{name}")
        assert resp.status == 200, name
        assert await resp.read() == body
        assert resp.headers["Content-Type"] == kind
        for header, value in SECURITY_HEADERS.items():
            assert resp.headers[header] == value, (name, header)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    assert "'unsafe-eval'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert (await client.get("/ui/../v1/batches")).status in (401, 404)
    assert (await client.get("/ui/nope.js")).status == 404


async def test_console_is_off_without_the_admin_api(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(build_app(make_settings("http://127.0.0.1:1", redis_url)))
    for path in ("/ui", "/ui/", "/ui/app.js"):
        assert (await client.get(path)).status == 404, path


async def test_batches_carry_progress_and_poll_period(running: Any) -> None:
    client, sim = running
    [batch] = await data(client, "/v1/batches")
    counts = Counter(c["status"] for c in sim.calls(sim.batch_ids[0]))
    assert batch["counts"] == dict(counts)
    progress = batch["progress"]
    assert progress["pending"] == counts["pending"]
    assert list(progress["ended"]) == [
        s for s in ("completed", "failed", "no_answer", "busy", "cancelled") if counts[s]
    ]
    assert progress["pending"] + progress["active"] + sum(progress["ended"].values()) == 30
    assert batch["poll_interval_s"] == 1
    # Measured only after two polls by this replica.
    assert batch["poll_period_s"] is None or batch["poll_period_s"] > 0


async def test_calls_page_through_the_snapshot(running: Any) -> None:
    client, sim = running
    batch_id = sim.batch_ids[0]
    truth = {c["call_id"]: c["status"] for c in sim.calls(batch_id)}
    first = await data(client, f"/v1/batches/{batch_id}/calls?limit=20")
    second = await data(client, f"/v1/batches/{batch_id}/calls?limit=20&offset=20")
    items = first["items"] + second["items"]
    assert (first["total"], len(first["items"]), len(second["items"])) == (30, 20, 10)
    assert [c["call_id"] for c in items] == sorted(truth)
    assert {c["call_id"]: c["status"] for c in items} == truth
    status, n = Counter(truth.values()).most_common(1)[0]
    page = await data(client, f"/v1/batches/{batch_id}/calls?status={status}")
    assert page["total"] == n
    assert {c["status"] for c in page["items"]} == {status}
    assert page["status"] == status
    resp = await client.get("/v1/batches/sched_unknown/calls", headers=AUTH)
    assert resp.status == 404
    resp = await client.get(f"/v1/batches/{batch_id}/calls?limit=x", headers=AUTH)
    assert resp.status == 400


async def test_timeline_shows_each_events_deliveries(running: Any) -> None:
    client, sim = running
    batch_id = sim.batch_ids[0]
    call = next(c for c in sim.calls(batch_id) if c["status"] != "pending")
    t = await data(client, f"/v1/batches/{batch_id}/calls/{call['call_id']}/timeline")
    event = t["timeline"][-1]
    states = {d["subscription"]: d["state"] for d in event["deliveries"]}
    assert states == {"crm": "delivered", "refusing": "dead"}
    crm = next(d for d in event["deliveries"] if d["subscription"] == "crm")
    assert crm["event_id"] == event["event_id"]
    assert crm["history"][-1]["status"] == 200


async def test_dead_letters_carry_body_and_total(running: Any) -> None:
    client, _ = running
    page = await data(client, "/v1/subscriptions/refusing/dead-letters?limit=2")
    assert page["total"] > 2
    assert len(page["items"]) == 2
    item = page["items"][0]
    body = orjson.loads(item["body"])
    assert body["type"] == item["type"]
    assert item["history"][-1]["status"] == 500


async def test_subscriptions_show_breaker_and_recent_deliveries(running: Any) -> None:
    client, _ = running
    subs = {s["name"]: s for s in await data(client, "/v1/subscriptions")}
    crm, refusing = subs["crm"], subs["refusing"]
    assert crm["breaker"] == "closed"
    assert refusing["breaker"] == "open"  # every one of >= 3 attempts failed: a 60 s pause
    assert refusing["breaker_open_until_ms"] > 0
    assert crm["recent"]["success_ratio"] == 1.0
    assert crm["recent"]["attempts"] == crm["recent"]["successes"] > 0
    assert crm["recent"]["lag_count"] > 0
    assert crm["recent"]["lag_mean_s"] >= 0
    assert refusing["recent"]["success_ratio"] == 0.0
    assert refusing["recent"]["attempts"] == refusing["queue"]["dead"] >= 3
