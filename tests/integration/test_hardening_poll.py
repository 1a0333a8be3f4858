"""Defects found by reading the poll path (issue 23, items 0-9), each pinned by a test
that failed before its fix: real Redis, real simulator, real receivers."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.backoff import NoBackoff
from redis.retry import Retry

from callbridge.app import Bridge
from callbridge.config import RedisSettings
from callbridge.errors import DuplicateReplicaError, RateLimitedError
from callbridge.janitor import Janitor
from callbridge.metrics import Metrics
from callbridge.poll.batch_cache import BatchCache
from callbridge.poll.cycle import Poller
from callbridge.poll.scheduler import Scheduler
from callbridge.poll.second_look import restored_suspects
from callbridge.poll.upstream import UpstreamClient
from callbridge.poll.upstream_health import UNREACHABLE_AFTER_SCANS
from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from callbridge.store.connection import connect
from callbridge.store.durability import persistence_problems
from callbridge.store.embedded import EmbeddedRedis, find_server_binary
from callbridge.store.keys import Keys
from callbridge.store.leases import LeaseStore
from callbridge.store.preflight import check_reachable
from callbridge.store.presence import WINDOW_MS, Presence
from callbridge.store.ratelimit import RedisRateLimiter
from callbridge.store.snapshots import BatchMeta
from tests.integration import test_planner_plans as plans
from tests.support.bridge import write_config
from tests.support.bridges import MakeService, sim_config
from tests.support.gates import after_unfiltered_page
from tests.support.metrics import sample
from tests.support.prometheus import wait_for
from tests.support.proxy import ReplyDropper
from tests.support.receivers import Receiver
from tests.support.replicas import Replica
from tests.support.scenario import until
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET, make_settings
from tests.support.startup import assert_one_line, cannot_start
from tests.support.tls import TlsFront, make_certificates

T1 = "2026-01-01T10:00:00Z"
T2 = "2026-01-01T10:05:00Z"
ENDED = {"started_at": T1, "ended_at": T2, "duration_seconds": 300}
REDIALLED = {"started_at": None, "ended_at": None, "duration_seconds": None}


async def _events(svc: Bridge, batch: str, call: str) -> list[tuple[str, int]]:
    return [
        (e["event_type"], e["sequence"])
        for e in await svc.store.timeline(batch, call)
        if e["event_type"] is not None
    ]


async def _two_calls(make_service: MakeService, **sections: Any) -> tuple[Bridge, Simulator]:
    """A batch of two calls that move only when the test says so."""
    svc, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=2), **sections)
    return svc, sim


# -- item 1 -------------------------------------------------------------------------


async def test_a_full_scan_does_not_complete_a_batch_while_a_redial_awaits_its_second_look(
    make_service: MakeService,
) -> None:
    """A completed, B in progress; the next scan shows A queued (a redial: one look) and
    B completed. Every stored status is terminal then, but A may be dialling again:
    `batch.completed` waits for A's second look."""
    svc, sim = await _two_calls(make_service, poller={"scan": "full"})
    batch = sim.batch_ids[0]
    a, b = (c["call_id"] for c in sim.calls(batch))
    sim.set_call(batch, a, status="completed", **ENDED)
    sim.set_call(batch, b, status="in_progress", started_at=T1)
    assert await svc.poller.poll_once(batch) == "committed"
    sim.set_call(batch, a, status="queued", **REDIALLED)
    sim.set_call(batch, b, status="completed", **ENDED)
    await svc.poller.poll_once(batch)
    meta = await svc.store.load_meta(batch)
    assert (meta.completed, meta.completions) == (False, 0)
    # The second look confirms the redial; the batch completes once A ends again.
    await svc.poller.poll_once(batch)
    assert await _events(svc, batch, a) == [("call.completed", 1), ("call.queued", 2)]
    assert (await svc.store.load_meta(batch)).completions == 0
    sim.set_call(batch, a, status="completed", started_at=T2, ended_at=T2)
    await svc.poller.poll_once(batch)
    meta = await svc.store.load_meta(batch)
    assert (meta.completed, meta.completions) == (True, 1)


async def test_a_stale_copy_of_a_finished_call_only_delays_completion_by_a_scan(
    make_service: MakeService,
) -> None:
    """The backward copy was stale (the next scan serves A as it was): the batch then
    completes, once, and A gets no event."""
    svc, sim = await _two_calls(make_service, poller={"scan": "full"})
    batch = sim.batch_ids[0]
    a, b = (c["call_id"] for c in sim.calls(batch))
    sim.set_call(batch, a, status="completed", **ENDED)
    sim.set_call(batch, b, status="in_progress", started_at=T1)
    await svc.poller.poll_once(batch)
    sim.set_call(batch, a, status="queued", **REDIALLED)
    sim.set_call(batch, b, status="completed", **ENDED)
    await svc.poller.poll_once(batch)
    sim.set_call(batch, a, status="completed", **ENDED)
    await svc.poller.poll_once(batch)
    meta = await svc.store.load_meta(batch)
    assert (meta.completed, meta.completions) == (True, 1)
    assert await _events(svc, batch, a) == [("call.completed", 1)]


# -- item 2 -------------------------------------------------------------------------


async def test_a_failed_fan_out_after_a_good_commit_settles_the_plan(
    make_service: MakeService, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The first cycle's commit stands and its fan-out fails (the subscription's queue is
    broken): the cycle is committed, not crashed, its events wait in the outbox, and the
    planner learnt from it, so the next cycle is not a cold full read again."""
    svc, sim, _ = await make_service(
        sim_config(batches=1, calls_per_batch=30), upstream={"page_size": 2}
    )
    batch = sim.batch_ids[0]
    sim.advance(2)  # calls past pending: the first cycle has events to fan out
    due = Keys().due("crm")
    await redis_client.set(due, "not a sorted set")
    with caplog.at_level(logging.WARNING):
        assert await svc.poller.poll_once(batch) == "committed"
    assert [r.action for r in caplog.records if hasattr(r, "action")] == ["fanout_failed"]
    assert await redis_client.xlen(Keys().outbox(batch)) > 0
    await redis_client.delete(due)
    await svc.poller.poll_once(batch)
    assert (await svc.store.load_meta(batch)).scan_reason != "cold"
    assert await redis_client.xlen(Keys().outbox(batch)) == 0


# -- item 3 -------------------------------------------------------------------------


async def test_a_fleet_wide_429_is_not_being_cut_off(make_service: MakeService) -> None:
    """Scans answered 429 with a Retry-After longer than the interval: the platform
    answers, it asks us to slow down. The replica must not step aside (hand its
    batches to replicas that start cold) as if it could not reach the platform."""
    svc, sim, _ = await make_service(
        sim_config(
            batches=1,
            calls_per_batch=3,
            faults=FaultConfig(rate_limit_ratio=1.0, retry_after_seconds=0.5),
        ),
        poller={"interval_seconds": 0.2},
    )
    batch = sim.batch_ids[0]
    for _ in range(UNREACHABLE_AFTER_SCANS):
        assert await svc.poller.poll_once(batch) == "failed"
    assert svc.poller.reach.can_poll


async def test_an_http_date_retry_after_is_honoured(
    aiohttp_server: Any, redis_client: aioredis.Redis, redis_url: str
) -> None:
    """``Retry-After: <HTTP-date>`` 30 s ahead was read as absent: a 1 s penalty."""
    retry_at = email.utils.formatdate(time.time() + 30, usegmt=True)

    async def limited(request: web.Request) -> web.Response:
        return web.json_response({}, status=429, headers={"Retry-After": retry_at})

    app = web.Application()
    app.router.add_get("/api/v1/public/call-batches/{batch}/calls", limited)
    server = await aiohttp_server(app)
    settings = make_settings(str(server.make_url("")), redis_url)
    limiter = RedisRateLimiter(redis_client, Keys().upstream_budget(), 10)
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(settings.upstream, session, limiter, Metrics())
        with pytest.raises(RateLimitedError) as rl:
            await client.fetch_page("sched_x", 1, retry_within_s=0.1)
    assert rl.value.retry_after_s is not None
    assert 28 <= rl.value.retry_after_s <= 30
    await asyncio.gather(*limiter._pending)
    seconds, micros = await redis_client.time()
    tat_ms = float(await redis_client.get(Keys().upstream_budget()))
    assert tat_ms - (seconds * 1000 + micros / 1000) >= 27_000


async def test_a_penalty_takes_back_a_slot_already_handed_out(
    redis_client: aioredis.Redis,
) -> None:
    """A request waiting for its slot when a 429 arrives must wait out the penalty too
    (before, it went out at its slot's time, into the platform's Retry-After)."""
    limiter = RedisRateLimiter(redis_client, Keys().upstream_budget(), 2)
    await limiter.acquire()
    started = time.monotonic()
    waiting = asyncio.create_task(limiter.acquire())  # its slot is ~0.5 s ahead
    await asyncio.sleep(0.1)
    limiter.penalize(1.5)
    await waiting
    assert time.monotonic() - started >= 1.5


# -- item 4 -------------------------------------------------------------------------


def one_call_left_the_list() -> Callable[..., Any]:
    """Once, a filtered page lacks its last item while ``total`` and ``has_more`` still
    count it: a call left the list between the server's count and its query."""
    raced: list[bool] = []

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if raced or "status" not in request.query or request.query["status"] == "pending":
            return response
        assert isinstance(response, web.Response)
        assert response.body is not None
        doc = orjson.loads(bytes(response.body))  # type: ignore[arg-type]
        if not doc["data"]["items"]:
            return response
        doc["data"]["items"].pop()
        raced.append(True)
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    return middleware


async def test_a_filtered_page_off_by_one_does_not_cost_an_hour_of_full_scans(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    sim = plans.simulator()
    clock = plans.Clock()
    svc, poller, _ = await plans.bridge(
        aiohttp_server, redis_url, sim, middleware=one_call_left_the_list(), clock=clock
    )
    try:
        assert await plans.plan_of(poller) == "full:cold"
        sim.advance(3)
        clock.now += 2
        # That cycle cannot trust its counts: it reads every page, nothing is lost...
        assert await plans.plan_of(poller) == "full:anomaly"
        plans.assert_in_step(poller, sim)
        # ...and the next one reads actively again: a race is not a broken filter.
        sim.advance()
        clock.now += 2
        assert await plans.plan_of(poller) == "active:cheaper"
        plans.assert_in_step(poller, sim)
        assert sample(svc.metrics, "upstream_anomalies_total", kind="status_filter_race") == 1
    finally:
        await svc.close()


# -- item 5 -------------------------------------------------------------------------


def short_pages(*, at_most: int, times: int | None = None) -> Callable[..., Any]:
    """Unfiltered pages that hold at most `at_most` items (`times`: only that many
    times) while they echo the limit asked for and say ``has_more``: the next page
    number starts a whole limit further on."""
    served: list[bool] = []

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if "status" in request.query or "external_id" in request.query:
            return response
        if times is not None and len(served) >= times:
            return response
        assert isinstance(response, web.Response)
        assert response.body is not None
        doc = orjson.loads(bytes(response.body))  # type: ignore[arg-type]
        if not doc["data"]["has_more"] or len(doc["data"]["items"]) <= at_most:
            return response
        doc["data"]["items"] = doc["data"]["items"][:at_most]
        served.append(True)
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    return middleware


@pytest.mark.parametrize(("at_most", "times"), [(3, None), (4, 1)], ids=["always", "once (a race)"])
async def test_short_pages_skip_no_call(
    make_service: MakeService, at_most: int, times: int | None
) -> None:
    """A platform serving 3 items a page while it echoes ``limit=5`` (or one page one
    item short, once): the calls in the gap were never seen, scan after scan."""
    svc, sim, _ = await make_service(
        sim_config(batches=1, calls_per_batch=20),
        upstream={"page_size": 5},
        upstream_middlewares=[short_pages(at_most=at_most, times=times)],
        poller={"scan": "full"},
    )
    batch = sim.batch_ids[0]
    await svc.poller.poll_once(batch)
    rt = svc.poller.runtime(batch)
    assert rt is not None
    assert rt.states is not None
    assert sorted(rt.states) == sorted(c["call_id"] for c in sim.calls(batch))
    assert (await svc.store.load_meta(batch)).counts == {"pending": 20}


# -- item 6 -------------------------------------------------------------------------


class WallClock:
    """The wall clock (ms) the test moves: the batch's lifetime rules."""

    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def __call__(self) -> int:
        return self.ms


def clocked_poller(svc: Bridge, clock: WallClock) -> Poller:
    return Poller(
        svc.settings, svc.store, svc.leases, svc.upstream, svc.relay, svc.metrics,
        replica_id="clocked", wall_ms=clock,
    )  # fmt: skip


def hidden_by(call_ids: set[str]) -> Callable[..., Any]:
    """The platform does not list the calls in `call_ids` (deleted on its side) while
    they are in it."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if not call_ids:
            return response
        assert isinstance(response, web.Response)
        assert response.body is not None
        doc = orjson.loads(bytes(response.body))  # type: ignore[arg-type]
        if doc.get("data") is None:
            return response
        items = doc["data"]["items"]
        doc["data"]["items"] = [i for i in items if i["call_id"] not in call_ids]
        doc["data"]["total"] -= len(items) - len(doc["data"]["items"])
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    return middleware


async def test_a_call_the_platform_stops_listing_does_not_hold_its_batch_open(
    make_service: MakeService,
) -> None:
    """A ringing call vanishes from every page: it kept its batch open forever. Missing
    from every full scan for `vanished_call_seconds`, it is reported once, removed."""
    gone: set[str] = set()
    svc, sim, receiver = await make_service(
        sim_config(batches=1, calls_per_batch=3),
        poller={"scan": "full", "vanished_call_seconds": 600},
        upstream_middlewares=[hidden_by(gone)],
    )
    batch = sim.batch_ids[0]
    a, b, c = (item["call_id"] for item in sim.calls(batch))
    clock = WallClock()
    poller = clocked_poller(svc, clock)
    sim.set_call(batch, a, status="completed", **ENDED)
    sim.set_call(batch, b, status="completed", **ENDED)
    sim.set_call(batch, c, status="ringing", started_at=T1)
    await poller.poll_once(batch)
    gone.add(c)
    for _ in range(4):  # a scan misses it, the next ones read every page: still gone
        clock.ms += 300_000
        await poller.poll_once(batch)
    meta = await svc.store.load_meta(batch)
    assert meta.counts == {"completed": 2, "removed": 1}
    assert (meta.completed, meta.completions) == (True, 1)
    for _ in range(2):
        clock.ms += 300_000
        await poller.poll_once(batch)
    await svc.deliverer.drain()
    updates = [
        p["data"]
        for p in receiver.verify_all(SECRET)
        if p["type"] == "call.updated" and p["data"]["call_id"] == c
    ]
    assert len(updates) == 1
    assert {k: updates[0][k] for k in ("status", "removed", "call")} == {
        "status": "ringing",
        "removed": True,
        "call": None,
    }
    assert [p["type"] for p in receiver.verify_all(SECRET)].count("batch.completed") == 1


async def test_a_call_missing_from_one_scan_is_not_removed(make_service: MakeService) -> None:
    gone: set[str] = set()
    svc, sim, _ = await make_service(
        sim_config(batches=1, calls_per_batch=3),
        poller={"scan": "full", "vanished_call_seconds": 600},
        upstream_middlewares=[hidden_by(gone)],
    )
    batch = sim.batch_ids[0]
    c = sim.calls(batch)[2]["call_id"]
    clock = WallClock()
    poller = clocked_poller(svc, clock)
    sim.set_call(batch, c, status="ringing", started_at=T1)
    await poller.poll_once(batch)
    gone.add(c)
    for _ in range(2):
        clock.ms += 400_000
        await poller.poll_once(batch)
    gone.clear()  # served again before its time was up
    clock.ms += 400_000
    await poller.poll_once(batch)
    gone.add(c)
    for _ in range(2):
        clock.ms += 400_000
        await poller.poll_once(batch)
    meta = await svc.store.load_meta(batch)
    assert meta.counts == {"pending": 2, "ringing": 1}


async def test_an_undocumented_status_that_stays_put_lets_the_batch_complete(
    make_service: MakeService,
) -> None:
    svc, sim = await _two_calls(
        make_service, poller={"scan": "full", "unknown_status_final_seconds": 600}
    )
    batch = sim.batch_ids[0]
    a, b = (item["call_id"] for item in sim.calls(batch))
    clock = WallClock()
    poller = clocked_poller(svc, clock)
    sim.set_call(batch, a, status="completed", **ENDED)
    sim.set_call(batch, b, status="voicemail")
    await poller.poll_once(batch)
    clock.ms += 300_000
    await poller.poll_once(batch)
    assert not (await svc.store.load_meta(batch)).completed  # still moving lately
    clock.ms += 300_000
    await poller.poll_once(batch)
    meta = await svc.store.load_meta(batch)
    assert (meta.completed, meta.completions) == (True, 1)
    # An edit of a finished call afterwards does not reopen it.
    sim.set_call(batch, a, metadata={"note": "called back"})
    await poller.poll_once(batch)
    assert (await svc.store.load_meta(batch)).completed
    # A documented status again does.
    sim.set_call(batch, b, status="in_progress")
    await poller.poll_once(batch)
    assert not (await svc.store.load_meta(batch)).completed


async def test_a_batch_answering_404_for_good_retires_with_an_event(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    svc, _, receiver = await make_service(
        sim_config(batches=1, calls_per_batch=1), poller={"not_found_retire_seconds": 3600}
    )
    batch = "sched_deleted"
    await svc.operations.add_batch(batch)
    clock = WallClock()
    poller = clocked_poller(svc, clock)
    scheduler = Scheduler(
        svc.settings, poller, svc.store, svc.leases, svc.registry, svc.relay, svc.metrics,
        wall_ms=clock,
    )  # fmt: skip
    await scheduler.sync()
    rt = poller.runtime(batch)
    assert rt is not None
    sem = asyncio.Semaphore(1)
    await scheduler.run_cycle(rt, sem)
    assert poller.lifecycle_of(rt) == "not_found"
    clock.ms += 1_800_000
    await scheduler.run_cycle(rt, sem)
    assert poller.runtime(batch) is not None  # not yet
    clock.ms += 1_800_000
    await scheduler.run_cycle(rt, sem)
    assert poller.runtime(batch) is None
    registration = await svc.registry.get(batch)
    assert registration is not None
    assert registration.retired
    assert await redis_client.pttl(Keys().batch_meta(batch)) > 0
    await svc.deliverer.drain()
    retired = [p for p in receiver.verify_all(SECRET) if p["type"] == "batch.retired"]
    assert [p["data"]["reason"] for p in retired] == ["not_found"]


def test_a_batch_meta_of_the_previous_release_reads_as_nothing_vanished_or_ended() -> None:
    """Replicas are upgraded one at a time: the meta an older release wrote has no
    `vanished`, `ended` nor `suspects_twice` (its first looks were each served once)."""
    suspect = b'{"call_id":"c1","status":"queued"}'
    meta = BatchMeta.from_redis(
        {
            b"version": b"7",
            b"not_found_since_ms": b"5",
            b"commit_id": b"c0",
            b"suspects": b"c0\n[" + suspect + b"]",
        }
    )
    assert (meta.version, meta.vanished, meta.ended) == (7, {}, "")
    assert (meta.suspects, meta.suspects_twice) == ([suspect], [])
    assert not restored_suspects(meta.suspects, meta.suspects_twice)["c1"].twice
    fields = meta.to_fields("c1")
    assert (
        BatchMeta.from_redis(
            {
                k.encode(): v.encode()
                for k, v in {**fields, "version": "7", "commit_id": "c1"}.items()
            }
        )
        == meta
    )


# -- item 7 -------------------------------------------------------------------------

ADMIN_TOKEN = "admin-token-for-tests-0123456789"


@pytest.mark.parametrize("stop", ["retired", "removed"])
async def test_a_batch_stopped_by_a_process_killed_before_its_expiry_still_expires(
    stop: str, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    """`callbridge run` is SIGKILLed between marking a batch stopped (retired, or
    removed by DELETE) and setting its keys' expiry: the PEXPIRE never reaches Redis
    (held by a proxy). Nobody polls a stopped batch, so nobody retried: its keys stayed
    for good. Any replica's janitor now gives them their expiry."""
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=5, batches=1, calls_per_batch=2))
    batch = sim.batch_ids[0]
    for item in sim.calls(batch):
        sim.set_call(batch, item["call_id"], status="completed", **ENDED)
    upstream = await aiohttp_server(make_app(sim))
    hook = await aiohttp_server(Receiver().app())
    proxy = ReplyDropper(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    via = f"redis://127.0.0.1:{await proxy.start()}/0"
    snapshot = Keys().snapshot(batch).encode()
    proxy.hold(b"PEXPIRE\r\n$%d\r\n%s" % (len(snapshot), snapshot))
    quick = {"quiet_period_seconds": 0.1, "linger_seconds": 0.1, "linger_interval_seconds": 0.1}
    config = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        via,
        str(hook.make_url("/hook")),
        [batch],
        poller=quick if stop == "retired" else {},
        admin={"token": ADMIN_TOKEN},
    )
    replica = Replica(config, tmp_path / "replica.log")
    try:
        await replica.start()
        async with aiohttp.ClientSession() as session:
            await replica.wait_healthy(session)
            if stop == "removed":
                # Once it polled the batch (its state exists), an operator removes it.
                await wait_for(
                    lambda: redis_client.hget(Keys().batch_meta(batch), "last_poll_ms"),
                    timeout_s=20,
                    what="the first poll",
                    every_s=0.05,
                )
                headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                removal = asyncio.create_task(
                    session.delete(f"{replica.url}/v1/batches/{batch}", headers=headers)
                )
            await asyncio.wait_for(proxy.held.wait(), 20)
            await replica.kill()
            if stop == "removed":
                removal.cancel()
                await asyncio.gather(removal, return_exceptions=True)
    finally:
        await replica.stop()
        await proxy.close()
    assert await redis_client.pttl(snapshot) == -1  # what the kill left
    settings = make_settings(str(upstream.make_url("")), redis_url, batches=[batch])
    await Janitor(settings, redis_client, Keys(), Metrics()).run_once()
    retention_ms = settings.poller.retired_retention_seconds * 1000
    for key in (Keys().snapshot(batch), Keys().batch_meta(batch), Keys().timeline(batch)):
        assert 0 < await redis_client.pttl(key) <= retention_ms, key


# -- item 8 -------------------------------------------------------------------------


async def test_a_scheduling_round_is_linear_in_the_batches(make_service: MakeService) -> None:
    """`owned()` (a sort of every batch) ran once per due batch another replica holds:
    O(n^2) per round, seconds of CPU at thousands of batches."""
    svc, _, _ = await make_service(sim_config(batches=1, calls_per_batch=1))
    poller = svc.poller
    for i in range(10_000):
        rt = BatchCache(f"sched_{i:05d}", True, next_due=0.0)
        if i % 2:
            rt.token, rt.next_due = "ours", 1e12  # held, not due
        poller.batches[rt.batch_id] = rt
    started = time.process_time()
    assert svc.scheduler.start_due(1.0, 1, asyncio.Semaphore(1), 5.0) == []
    assert time.process_time() - started < 0.5


async def test_a_second_process_under_a_live_replica_id_refuses_to_start(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    """Two `callbridge run` under one server.replica_id took each other's leases every
    cycle (a token of the same replica id is taken over at once, as a restarted
    replica's). The second now exits 3 with one line naming the key; the first keeps
    its batches."""
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=5, batches=2, calls_per_batch=5))
    upstream = await aiohttp_server(make_app(sim))
    hook = await aiohttp_server(Receiver().app())
    config = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(hook.make_url("/hook")),
        sim.batch_ids,
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Replica(config, tmp_path / "a" / "twin.log")
    second = Replica(config, tmp_path / "b" / "twin.log")
    try:
        await first.start()
        async with aiohttp.ClientSession() as session:
            await first.wait_healthy(session)
        # The first replica takes its batches' leases over its first cycles (starts are
        # spread), not all before /healthz answers: wait for both, bounded.
        owners: dict[str, bytes | None] = {}

        async def both_held() -> bool:
            owners.update({b: await redis_client.get(Keys().lease(b)) for b in sim.batch_ids})
            return all(owners.values())

        await until(both_held, within_s=15, every_s=0.1)
        started = time.monotonic()
        await second.start()
        assert second.proc is not None
        assert await asyncio.wait_for(second.proc.wait(), 15) == 3
        assert time.monotonic() - started < 10
        lines = (tmp_path / "b" / "twin.log").read_text().strip().splitlines()
        # "starting", the Redis primary it checked, then why it cannot.
        lines = [line for line in lines if "action=redis_checked" not in line]
        assert len(lines) == 2, lines
        assert lines[1].startswith("callbridge: cannot start: ")
        assert "server.replica_id" in lines[1]
        assert "'twin'" in lines[1]
        assert first.alive
        assert {b: await redis_client.get(Keys().lease(b)) for b in sim.batch_ids} == owners
    finally:
        await second.stop()
        await first.stop()


async def test_a_process_restarted_after_a_sigkill_takes_over_at_once(
    redis_client: aioredis.Redis,
) -> None:
    """The predecessor's last beat is fresh but it does not beat again: no refusal."""
    keys = Keys()
    killed = Presence(redis_client, keys, "pod-1")
    await killed.beat()  # then SIGKILLed: it never beats again
    restarted = Presence(redis_client, keys, "pod-1")
    started = time.monotonic()
    await restarted.claim()
    assert time.monotonic() - started <= WINDOW_MS / 1000 + 0.5
    # A live one is told apart: it keeps beating.
    live = Presence(redis_client, keys, "pod-2")
    await live.beat()
    twin = Presence(redis_client, keys, "pod-2")

    async def beat_on(seconds: float) -> None:
        await live.beat()  # the live twin beats while the newcomer waits to tell

    with pytest.raises(DuplicateReplicaError, match=r"server\.replica_id"):
        await twin.claim(sleep=beat_on)


async def test_a_replica_takes_over_only_its_own_predecessors_leases(
    redis_client: aioredis.Redis,
) -> None:
    """A token's replica part was matched as a prefix: replica "a" took the leases of
    live replica "a:x" as if they were its own predecessor's."""
    leases = LeaseStore(redis_client, Keys())
    assert await leases.acquire("sched_1", "a:x:1f2e3d4c5b6a", 10_000)
    assert not await leases.acquire("sched_1", "a:0a1b2c3d4e5f", 10_000)
    assert await leases.acquire("sched_1", "a:x:999999999999", 10_000)  # its own successor


# -- item 9 -------------------------------------------------------------------------


def password_protected_valkey(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = EmbeddedRedis(tmp_path / "pw").command(find_server_binary(), port)
    (tmp_path / "pw").mkdir()
    proc = subprocess.Popen(
        [*cmd, "--requirepass", "right-pass"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = redis.Redis(port=port, password="right-pass", retry=Retry(NoBackoff(), 0))
    for _ in range(200):
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                break
        time.sleep(0.025)
    client.close()
    return proc, port


@pytest.mark.parametrize("cause", ["unreachable", "password", "certificate"])
async def test_a_redis_that_cannot_be_used_at_start_is_one_line_and_exit_3(
    cause: str, tmp_path: Path, redis_url: str
) -> None:
    """Nothing listening, a wrong password, a certificate the CA does not sign: a raw
    traceback and exit 1 after 19 s of hidden retries (a config without batches and
    subscriptions never exited when the retries did not give up)."""
    procs: list[subprocess.Popen[bytes]] = []
    front: TlsFront | None = None
    try:
        if cause == "unreachable":
            url, says = f"redis://:s3cret@127.0.0.1:{free_port()}/0", "cannot connect"
        elif cause == "password":
            proc, port = password_protected_valkey(tmp_path)
            procs.append(proc)
            url, says = f"redis://:s3cret@127.0.0.1:{port}/0", "refused the user or password"
        else:
            certs = make_certificates(tmp_path / "tls")
            front = TlsFront(certs, int(redis_url.rsplit(":", 1)[1].split("/")[0]))
            port = await front.start()
            # The certificate is sound: with the CA that signed it, Redis answers...
            await check_reachable(
                f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca}", RedisSettings()
            )
            # ...with another CA it is refused.
            url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.other_ca}"
            says = "TLS certificate is not trusted"
        code, seconds, lines = await cannot_start(tmp_path, url)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        if front is not None:
            await front.close()
    assert code == 3, lines
    assert seconds < 10
    assert_one_line(lines, says)


@pytest.mark.slow
async def test_a_redis_that_never_answers_at_start_is_one_line_within_ten_seconds(
    tmp_path: Path,
) -> None:
    """Packets dropped: the connection (or its first answer) never comes."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        code, seconds, lines = await cannot_start(tmp_path, f"redis://127.0.0.1:{port}/0")
    finally:
        silent.close()
    assert code == 3, lines
    assert seconds < 10
    assert_one_line(lines, "no answer within")


async def test_the_persistence_check_does_not_call_an_unreachable_redis_durable() -> None:
    """It read any error as "CONFIG refused" (a managed service): nothing reported,
    `callbridge_redis_persistence_ok 1`, for a Redis it could not reach at all."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    client = connect(url, RedisSettings(url=url), retries=False)
    try:
        with pytest.raises(redis.ConnectionError):
            await persistence_problems(client)
    finally:
        await client.aclose()


# -- item 0 -------------------------------------------------------------------------


async def test_a_redial_served_twice_is_reported_though_it_came_back_to_the_item_we_knew(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    """Issue 23's loss in one cycle: seen ringing; no_answer unseen, redialled: its list
    and the page at the dialler's frontier serve it queued; then it rings again as the
    very item we knew (no field tells the attempts apart) before the look-up that was
    to be the second look. The look-up took it for a stale copy: the redial vanished.
    Served twice, it is reported, with ``missed_terminal``."""
    rig = await plans.frontier_rig(aiohttp_server, redis_url)
    sim, x, y, fields = rig.sim, rig.x, rig.y, rig.after_frontier
    svc, poller, receiver = rig.svc, rig.poller, rig.receiver
    try:
        assert await plans.plan_of(poller) == "full:cold"
        sim.set_call(plans.BATCH, x, status="ringing")
        sim.set_call(plans.BATCH, y, status="ringing")
        assert await plans.plan_of(poller) == "active:configured"
        ringing = next(c for c in sim.calls(plans.BATCH) if c["call_id"] == x)
        sim.set_call(plans.BATCH, x, status="no_answer")
        sim.set_call(plans.BATCH, x, status="queued")
        sim.set_call(plans.BATCH, y, status="no_answer")  # vanishes: the frontier is read
        fields.update(status="ringing")  # once the frontier page served x queued
        assert await plans.plan_of(poller) == "active:configured"
        assert not fields, "the frontier page was read"
        assert next(c for c in sim.calls(plans.BATCH) if c["call_id"] == x) == ringing
        assert await plans.plan_of(poller) == "active:configured"
        await svc.deliverer.drain()
        assert plans.events_of(receiver, x) == [
            ("call.ringing", "pending", False),
            ("call.queued", "ringing", True),
            ("call.ringing", "queued", False),
        ]
    finally:
        await svc.close()


@pytest.mark.parametrize("taken_over", [False, True], ids=["same owner", "taken over"])
async def test_a_redial_served_twice_survives_a_fall_back_to_a_full_scan(
    redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any, taken_over: bool
) -> None:
    """The active reads serve a call queued twice (its list, the frontier page), then
    the cycle falls back to a full scan (resolving would cost more), whose page serves
    it ringing as we knew it. The backward copies were left to the full scan's second
    looks, which never saw them: the redial vanished. What the reads served going back
    is committed first, as a first look served twice, which the next cycle confirms
    whatever it sees (also after a take-over: it is stored with the commit)."""
    sim = plans.simulator(40)
    calls = [c["call_id"] for c in sim.calls(plans.BATCH)]
    x, far = calls[3], calls[30:33]
    for call in calls[:3]:  # the frontier page ends at the first call still pending
        sim.set_call(plans.BATCH, call, status="completed")
    fields: dict[str, Any] = {}
    clock = plans.Clock()
    svc, poller, receiver = await plans.bridge(
        aiohttp_server,
        redis_url,
        sim,
        clock=clock,
        middleware=after_unfiltered_page(sim, plans.BATCH, x, fields),
    )
    try:
        assert await plans.plan_of(poller) == "full:cold"
        sim.set_call(plans.BATCH, x, status="ringing")
        for call in far:
            sim.set_call(plans.BATCH, call, status="ringing")
        clock.now += 2
        assert await plans.plan_of(poller) == "active:cheaper"
        ringing = next(c for c in sim.calls(plans.BATCH) if c["call_id"] == x)
        # Three calls vanish far from the frontier: more look-ups than the budget
        # leaves after the lists and the frontier page: the cycle falls back.
        for call in far:
            sim.set_call(plans.BATCH, call, status="completed")
        sim.set_call(plans.BATCH, x, status="no_answer")
        sim.set_call(plans.BATCH, x, status="queued")
        fields.update(status="ringing")
        clock.now += 2
        assert await plans.plan_of(poller) == "full:costly"
        assert not fields, "the frontier page was read"
        assert next(c for c in sim.calls(plans.BATCH) if c["call_id"] == x) == ringing
        rt = poller.runtime(plans.BATCH)
        assert rt is not None
        assert (rt.suspects[x].status, rt.suspects[x].twice) == ("queued", True)
        if taken_over:
            rt.drop_cache()  # the next owner loads what the commit stored
        clock.now += 2
        await plans.plan_of(poller)  # the second look, whatever the call shows
        await svc.deliverer.drain()
        assert plans.events_of(receiver, x) == [
            ("call.ringing", "pending", False),
            ("call.queued", "ringing", True),
            ("call.ringing", "queued", False),
        ]
    finally:
        await svc.close()
