"""Replay of every dead letter is a background job (issue 23 item 11): the request
answers at once with a recovery job of scope ``dead``, the job re-sends each letter
dead at that moment exactly once, skips one delivered meanwhile, and lives in Redis
(any replica carries it on). Jobs are stepped by awaiting the upkeep, never by sleeping.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from callbridge.api import BRIDGE, add_routes
from callbridge.app import Bridge
from callbridge.deliver.deliverer import Deliverer
from callbridge.metrics import Metrics
from callbridge.operations import Operations
from callbridge.store.keys import Keys
from callbridge.store.recovery import RecoveryJobs, job_id
from tests.support.bridges import MakeService, sim_config
from tests.support.deliveries import event
from tests.support.jobs import finish
from tests.support.receivers import Receiver

TOKEN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def bridge(make_service: MakeService) -> tuple[Bridge, Receiver]:
    """A bridge (its loops not running) and the receiver of its subscription crm."""
    svc, _, receiver = await make_service(sim_config(batches=1, calls_per_batch=1))
    return svc, receiver


async def dead_letters(svc: Bridge, n: int, prefix: str = "d") -> list[str]:
    """`n` dead letters of crm (a full backlog dead-letters at once), one call each."""
    events = [event(1, f"{prefix}{i}") for i in range(n)]
    await svc.queue.enqueue("crm", [(e, 1 + i) for i, e in enumerate(events)], max_backlog=0)
    return [e.id for e in events]


def operations(svc: Bridge, start_ms: int = 1_800_000_000_000) -> Operations:
    """`svc`'s operations on a clock that moves 1 ms per reading (two requests in the
    same millisecond are the same job) and that do not poke its upkeep."""
    ticks = itertools.count(start_ms)
    return Operations(
        svc.settings, svc.store, svc.leases, svc.registry, svc.queue,
        wall_ms=lambda: next(ticks), jobs=RecoveryJobs(svc.redis, Keys()),
    )  # fmt: skip


def worker(svc: Bridge) -> Deliverer:
    """A delivery worker on `svc`'s queue that steps no job."""
    return Deliverer(svc.settings, svc.queue, svc.deliverer.sender, Metrics())


async def admin_client(svc: Bridge, aiohttp_client: Any) -> Any:
    """The admin API over `svc`, whose loops do not run (the test steps them)."""
    app = web.Application()
    app[BRIDGE] = svc
    add_routes(app, TOKEN)
    return await aiohttp_client(app)


async def test_replay_all_answers_at_once_with_a_job_over_five_thousand_dead_letters(
    make_service: MakeService, aiohttp_client: Any
) -> None:
    """It requeued every letter inside the request, one round trip each (5,000: 0.85 s
    on a 2-core machine before, and without bound in the count); now one script copies
    the dead set and the answer is the job."""
    svc, receiver = await bridge(make_service)
    ids = await dead_letters(svc, 5000)
    client = await admin_client(svc, aiohttp_client)
    started = time.perf_counter()
    resp = await client.post("/v1/subscriptions/crm/dead-letters/replay", json={}, headers=AUTH)
    took_s = time.perf_counter() - started
    assert resp.status == 202, await resp.text()
    data = (await resp.json())["data"]
    job = data["job"]
    assert data["replayed"] == 0  # a previous release's CLI prints this
    assert (job["scope"], job["state"], job["since_ms"]) == ("dead", "running", 0)
    assert job["total"] == 5000
    assert await svc.queue.dead_count("crm") == 5000  # nothing done inside the request
    assert took_s < 0.5, took_s
    listed = await client.get(f"/v1/subscriptions/crm/recover/{job['id']}", headers=AUTH)
    assert (await listed.json())["data"]["scope"] == "dead"
    await finish(svc, job["id"])
    assert Counter(r.id for r in receiver.delivered) == Counter(ids)
    assert await svc.queue.dead_count("crm") == 0


async def test_the_replay_job_sends_each_dead_letter_once_and_skips_one_delivered_meanwhile(
    make_service: MakeService,
) -> None:
    svc, receiver = await bridge(make_service)
    ids = await dead_letters(svc, 40)
    ops = operations(svc)
    first = await ops.replay_all("crm")
    # The same request re-sent (a retrying client): a second job over the same letters.
    second = await ops.replay_all("crm")
    # Before either job reaches it, one letter is replayed by id and delivered by a
    # worker that steps no job.
    assert await ops.replay("crm", ["evt_d7_1"]) == 1
    assert await worker(svc).drain() == 1
    # A letter dead after the jobs began is not theirs.
    (late,) = await dead_letters(svc, 1, prefix="late")
    await finish(svc, first["id"], second["id"])
    got = Counter(r.id for r in receiver.delivered)
    assert got == Counter(ids), got
    jobs = RecoveryJobs(svc.redis, Keys())
    done = [await jobs.get("crm", j["id"]) for j in (first, second)]
    assert sum(j.requeued for j in done if j is not None) == 39
    assert await svc.queue.dead_count("crm") == 1
    # Asked again later: a new job, which picks up the newer letter.
    third = await ops.replay_all("crm")
    assert third["id"] not in (first["id"], second["id"])
    await finish(svc, third["id"])
    assert Counter(r.id for r in receiver.delivered)[late] == 1
    assert await svc.queue.dead_count("crm") == 0


async def test_the_replay_job_survives_a_restart_and_another_replica_carries_it_on(
    make_service: MakeService,
) -> None:
    a, receiver_a = await bridge(make_service)
    ids = await dead_letters(a, 300)
    job = await operations(a).replay_all("crm")
    # Replica a takes one page (as its upkeep does), delivers part of it, and dies.
    jobs = RecoveryJobs(a.redis, Keys())
    assert await jobs.step("crm", job["id"], page=100, ready_max=1000) == ("dead", 100)
    assert 0 < await worker(a).run_once() < 100
    await a.close()
    # Replica b knows nothing of the job but what Redis holds.
    b, receiver_b = await bridge(make_service)
    mid = await RecoveryJobs(b.redis, Keys()).get("crm", job["id"])
    assert mid is not None
    assert (mid.state, mid.scope, mid.requeued) == ("running", "dead", 100)
    await finish(b, job["id"])
    got = Counter(r.id for r in receiver_a.delivered + receiver_b.delivered)
    assert got == Counter(ids), got
    done = await RecoveryJobs(b.redis, Keys()).get("crm", job["id"])
    assert done is not None
    assert (done.state, done.scanned, done.requeued) == ("done", 300, 300)


async def test_a_job_written_by_the_previous_release_reads_as_scope_all(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """A rolling upgrade runs both releases against one Redis: a window job's hash
    without `scope` is a window job (dead letters and waiting retries), and window job
    ids are derived as before, so the same window asked again is still the same job."""
    svc, receiver = await bridge(make_service)
    assert job_id("crm", 10_000, 0) == "18d460980a179d72"  # the previous release's id
    ids = await dead_letters(svc, 3)
    jobs = RecoveryJobs(svc.redis, Keys())
    job, created = await jobs.start("crm", 0)
    assert created
    await redis_client.hdel(Keys().recover_job("crm", job.id), "scope")
    old = await jobs.get("crm", job.id)
    assert old is not None
    assert (old.scope, old.as_dict()["scope"]) == ("all", "all")
    assert await jobs.step("crm", job.id, page=100, ready_max=1000) == ("due", 3)
    await finish(svc, job.id)
    assert Counter(r.id for r in receiver.delivered) == Counter(ids)
    again, created = await jobs.start("crm", 0)
    assert (again.id, again.scope, created) == (job.id, "all", False)
