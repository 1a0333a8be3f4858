"""Defects of the delivery path found by reading main (issue 23, items 10-16), each
pinned by a test that failed before its fix: real Redis, real receivers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from callbridge.config import SubscriptionSettings
from callbridge.deliver.deliverer import Deliverer
from callbridge.deliver.retry import AttemptResult
from callbridge.deliver.sender import WebhookSender
from callbridge.metrics import Metrics
from callbridge.operations import Operations
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue
from callbridge.store.recovery import RecoveryJobs
from callbridge.store.scripts import source
from tests.support.bridges import MakeService, sim_config
from tests.support.deliveries import MakeRig, event
from tests.support.jobs import finish
from tests.support.metrics import sample
from tests.support.proxy import ReplyDropper


async def test_a_stuck_parked_delivery_behind_twenty_waiting_ones_is_freed_by_the_sweep(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """Item 15: the safety net looked at the 20 oldest parked deliveries only; one
    whose predecessor an older replica delivered, parked behind 20 rightly waiting
    ones, was never released (and counted toward the backlog for good)."""
    rig = await make_rig({"crm": {}})
    # 20 calls whose second event rightly waits for the first's first attempt...
    await rig.enqueue(
        "crm", *(e for c in range(20) for e in (event(1, f"c{c:02}"), event(2, f"c{c:02}")))
    )
    # ...and, parked later, one whose predecessor a previous release delivered
    # without releasing it.
    await rig.enqueue("crm", event(1, "z1"), event(2, "z1"))
    record = Keys().delivery("crm", "evt_z1_1")
    await redis_client.hset(record, mapping={"state": "delivered", "attempts": 1})
    await redis_client.zrem(Keys().due("crm"), "evt_z1_1")
    assert (await rig.queue.depths("crm"))["waiting"] == 21
    for _ in range(3):
        await rig.queue.sweep("crm", dead_retention_ms=60_000)
    state = await redis_client.hget(Keys().delivery("crm", "evt_z1_2"), "state")
    assert state == b"pending"
    depth = await rig.queue.depths("crm")
    assert (depth["waiting"], depth["ready"]) == (20, 21)


async def test_reclaim_gives_back_only_the_replicas_own_claims_not_a_longer_ids(
    make_rig: MakeRig,
) -> None:
    """Item 15: replica ids were matched by prefix: replica `a`, restarted, gave back
    the live claims of replica `a:x`."""
    rig = await make_rig({"crm": {}})
    await rig.enqueue("crm", event(1, "c1"), event(1, "c2"))
    mine = await rig.queue.claim(
        "crm", max_in_flight=9, limit=1, visibility_ms=60_000, token="a:old"
    )
    theirs = await rig.queue.claim(
        "crm", max_in_flight=9, limit=1, visibility_ms=60_000, token="a:x:live"
    )
    assert (len(mine), len(theirs)) == (1, 1)
    assert await rig.queue.reclaim_own("crm", "a", "a:new") == 1
    depth = await rig.queue.depths("crm")
    assert (depth["ready"], depth["inflight"]) == (1, 1)


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A URL whose SYNs are dropped: a listener that never accepts, its accept queue
    full (Linux then drops further SYNs, and connecting hangs until a timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    yield f"http://127.0.0.1:{port}/hook"
    for s in (*fillers, listener):
        s.close()


@pytest.mark.parametrize("client", ["lean", "aiohttp"])
async def test_a_black_holed_endpoint_opens_the_breaker_on_connect_timeouts(
    make_rig: MakeRig, black_hole: str, client: str
) -> None:
    """Item 14: a connect timeout counted as an ordinary failure (and reset the
    consecutive connection failures), so a black-holed endpoint only ever tripped
    the ratio rule, after 20 attempts each holding a slot for the whole timeout."""
    rig = await make_rig(
        {"crm": {"url": black_hole, "timeout_seconds": 0.3}},
        http_client=client,
        breaker_failure_threshold=3,
    )
    await rig.enqueue("crm", *(event(1, f"c{c}") for c in range(3)))
    # Retries are due at once (FAST): without the breaker, 4 attempts each.
    assert await rig.deliverer.drain() == 3
    record = await rig.queue.record("crm", "evt_c0_1")
    assert record is not None
    assert record["history"][-1]["error"].startswith("connect: timeout")
    assert (await rig.queue.endpoint("crm")).breaker == "open"


async def test_claims_given_back_by_the_sweep_count_as_attempts_and_end_dead(
    make_rig: MakeRig,
) -> None:
    """Item 10: a delivery whose worker dies every time (a poison payload) went back
    to the queue uncounted, every visibility deadline, for ever. Each claim given
    back is now a failed attempt; after the schedule (FAST: 3 retries) a dead letter."""
    rig = await make_rig({"crm": {}})
    await rig.enqueue("crm", event(1, "c1"))
    schedule = len(rig.settings.subscriptions[0].retry_schedule_seconds)
    for _ in range(schedule + 1):
        # Claimed with a deadline that passes at once: the worker "died".
        claimed = await rig.queue.claim(
            "crm", max_in_flight=9, limit=9, visibility_ms=0, token="r1:p"
        )
        assert [c.event_id for c in claimed] == ["evt_c1_1"]
        await rig.queue.sweep("crm", dead_retention_ms=60_000, retries=schedule)
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert (record["state"], record["attempts"]) == ("dead", schedule + 1)
    assert record["history"][-1]["error"].startswith("no outcome")
    assert (await rig.queue.depths("crm"))["dead"] == 1
    # Counted like any other dead letter (item 13: only an attempt's own outcome was).
    assert sample(rig.metrics, "dead_letters_total", subscription="crm") == 1


async def test_claims_of_a_dead_process_given_back_at_start_count_as_attempts(
    make_rig: MakeRig,
) -> None:
    """Item 10: reclaim_own (a restarted replica) gave claims back uncounted too."""
    rig = await make_rig({"crm": {}})
    await rig.enqueue("crm", event(1, "c1"), event(2, "c1"))
    await rig.queue.claim("crm", max_in_flight=9, limit=9, visibility_ms=60_000, token="r1:old")
    assert await rig.queue.reclaim_own("crm", "r1", "r1:new", retries=3) == 1
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert (record["state"], record["attempts"]) == ("pending", 1)
    # Its first attempt (lost) happened: the call's next event may start.
    assert (await rig.queue.depths("crm"))["ready"] == 2


class _PoisonedSender(WebhookSender):
    """The real sender, but a bug crashes it on one payload (a poison delivery)."""

    async def send(
        self,
        sub: SubscriptionSettings,
        keys: list[bytes],
        event_id: str,
        body: bytes,
        trace: Mapping[str, str] | None = None,
    ) -> AttemptResult:
        if event_id == "evt_poison_1":
            raise RuntimeError("a bug in the sender")
        return await super().send(sub, keys, event_id, body, trace)


async def test_a_delivery_whose_attempt_crashes_is_counted_and_dead_lettered(
    make_rig: MakeRig,
) -> None:
    """Item 10: a crashed attempt left its claim in flight until the sweep gave it
    back, uncounted: retried every visibility deadline for ever. It is now a failed
    attempt at once (not the endpoint's fault: the breaker is left alone)."""
    rig = await make_rig({"crm": {}})
    async with aiohttp.ClientSession() as session:
        sender = _PoisonedSender(session)
        deliverer = Deliverer(rig.settings, rig.queue, sender, Metrics())
        await rig.enqueue("crm", event(1, "poison"), event(1, "ok"))
        # FAST schedule: every retry is due at once, so drain makes all four.
        assert await deliverer.drain() == 5
    record = await rig.queue.record("crm", "evt_poison_1")
    assert record is not None
    assert (record["state"], record["attempts"]) == ("dead", 4)
    assert record["history"][-1]["error"] == "crashed: RuntimeError"
    assert len(rig.receivers["crm"].received) == 1
    endpoint = await rig.queue.endpoint("crm")
    assert (endpoint.breaker, endpoint.failures) == ("closed", 0)


async def test_delivery_lag_is_measured_on_the_redis_clock(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """Item 13: the lag subtracted the commit's Redis time from this replica's wall
    clock: a replica an hour ahead reported every delivery an hour late."""
    rig = await make_rig({"crm": {}})
    metrics = Metrics()
    ahead = Deliverer(
        rig.settings, rig.queue, rig.deliverer.sender, metrics, wall=lambda: time.time() + 3600
    )
    now_s, now_us = await redis_client.time()
    await rig.queue.enqueue("crm", [(event(1, "c1"), now_s * 1000 + now_us // 1000)])
    assert await ahead.drain() == 1
    assert sample(metrics, "delivery_lag_seconds_count", subscription="crm") == 1
    lag = sample(metrics, "delivery_lag_seconds_sum", subscription="crm")
    assert lag is not None
    assert 0 <= lag < 5


async def test_an_outcome_whose_record_is_gone_is_not_counted_as_a_dead_letter(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """Item 13: the last failed attempt of a delivery whose record went meanwhile
    (its subscription removed, an operator's purge) counted in dead_letters_total
    although nothing was dead-lettered."""
    rig = await make_rig({"crm": {}})
    receiver = rig.receivers["crm"]
    receiver.default, receiver.delay_s = 500, 0.2
    await rig.enqueue("crm", event(1, "c1"))
    record = Keys().delivery("crm", "evt_c1_1")
    await redis_client.hset(record, "attempts", 3)  # this attempt is the schedule's last
    run = asyncio.create_task(rig.deliverer.run_once())
    await receiver.arrived.wait()
    await redis_client.delete(record)
    assert await run == 1
    assert sample(rig.metrics, "dead_letters_total", subscription="crm") == 0
    assert (await rig.queue.depths("crm"))["dead"] == 0


@pytest.fixture
async def lossy_queue(
    redis_url: str, make_rig: MakeRig
) -> AsyncIterator[tuple[ReplyDropper, DeliveryQueue]]:
    """A queue whose Redis replies can be lost, through a client that tries twice
    without a pause (its retries run out at once, as they do at length in a real
    outage)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = ReplyDropper(port)
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{await proxy.start()}/0",
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )
    yield proxy, DeliveryQueue(client, Keys())
    await client.aclose()
    await proxy.close()


async def test_outcomes_not_written_are_written_by_the_next_step_not_sent_again(
    make_rig: MakeRig, lossy_queue: tuple[ReplyDropper, DeliveryQueue]
) -> None:
    """Item 12: the step writing a successful attempt's outcome failed (Redis out of
    reach for longer than the client's retries): the outcome was dropped, the claim
    sat in flight until its deadline and the delivery went out again."""
    proxy, queue = lossy_queue
    rig = await make_rig({"crm": {}})
    receiver = rig.receivers["crm"]
    receiver.delay_s = 0.05  # the loss is armed while the request runs
    deliverer = Deliverer(rig.settings, queue, rig.deliverer.sender, Metrics())
    await rig.enqueue("crm", event(1, "c1"))
    run = asyncio.create_task(deliverer.run_once())
    await receiver.arrived.wait()
    proxy.arm(_sha("claim"), times=5, request=True)
    assert await run == 1  # its outcome's write failed, logged
    proxy.disarm()
    await deliverer.drain()
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert record["state"] == "delivered"
    assert len(receiver.received) == 1


async def test_claims_whose_reply_was_lost_are_taken_up_by_the_next_step(
    make_rig: MakeRig, lossy_queue: tuple[ReplyDropper, DeliveryQueue]
) -> None:
    """Item 12: a claim whose reply was lost for good left its deliveries in the
    in-flight set, unsent, holding fleet slots until their deadline. The next step
    sends the same claim token again and gets them (claim.lua's receipt)."""
    proxy, queue = lossy_queue
    rig = await make_rig({"crm": {}})
    deliverer = Deliverer(rig.settings, queue, rig.deliverer.sender, Metrics())
    await rig.enqueue("crm", event(1, "c1"))
    proxy.arm(_sha("claim"), times=5)
    with pytest.raises(RedisConnectionError):
        await deliverer.run_once()
    proxy.disarm()
    assert (await rig.queue.depths("crm"))["inflight"] == 1  # claimed, reply lost
    assert await deliverer.drain() == 1
    assert len(rig.receivers["crm"].received) == 1
    depth = await rig.queue.depths("crm")
    assert (depth["inflight"], depth["ready"]) == (0, 0)


def _sha(script: str) -> bytes:
    return hashlib.sha1(source(script).encode()).hexdigest().encode()  # noqa: S324


async def test_redeliver_leaves_a_delivery_still_on_its_way_alone(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """Item 11: redeliver of a pending delivery reset its attempt budget (again and
    again: a failing one never dead-lettered), and of a parked one cleared its link
    to the call's previous event, so it could overtake it."""
    svc, _, _ = await make_service(sim_config(batches=1, calls_per_batch=1))
    await svc.queue.enqueue("crm", [(event(1, "c1"), 1), (event(2, "c1"), 1)])
    first = Keys().delivery("crm", "evt_c1_1")
    await redis_client.hset(first, "attempts", 2)  # failed twice, its retry is due
    # Both are on their way already: "scheduled", and nothing changes.
    assert await svc.operations.redeliver("evt_c1_1") == ["crm"]
    assert await svc.operations.redeliver("evt_c1_2") == ["crm"]
    assert await redis_client.hget(first, "attempts") == b"2"
    second = await redis_client.hmget(Keys().delivery("crm", "evt_c1_2"), "state", "prev")
    assert second == [b"waiting", b"evt_c1_1"]


async def test_replay_of_every_dead_letter_stops_at_the_backlog_bound(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """Item 11: replay ignored max_backlog: replaying 50,000 dead letters into a
    subscription bounded at 100,000 undelivered could put 150,000 in Redis. Replay of
    every one is a job now (test_replay_job.py): its steps make no more due than the
    bound leaves room for, and the rest follow as the backlog drains."""
    svc, _, receiver = await make_service(
        sim_config(batches=1, calls_per_batch=1), delivery={"max_backlog": 5}
    )
    # Eight dead letters (the backlog was full when they came) and three pending.
    await svc.queue.enqueue("crm", [(event(1, f"d{i}"), 1) for i in range(8)], max_backlog=0)
    await svc.queue.enqueue("crm", [(event(1, f"p{i}"), 1) for i in range(3)])
    job = await svc.operations.replay_all("crm")
    # One turn of the upkeep: two made due (5 - 3 pending), then the job waits.
    await svc.deliverer.run_once()
    assert await svc.queue.dead_count("crm") == 6
    mid = await RecoveryJobs(svc.redis, Keys()).get("crm", job["id"])
    assert mid is not None
    assert (mid.state, mid.requeued) == ("running", 2)
    await finish(svc, job["id"])
    assert len({r.id for r in receiver.delivered}) == 11
    assert await svc.queue.dead_count("crm") == 0


async def test_replay_does_not_resend_a_letter_delivered_while_it_checked(
    make_service: MakeService, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """Item 11: replay read a dead letter's state, then requeued it in another round
    trip; a letter replayed and delivered in between (another operator's replay) was
    sent again. The state is now checked by the requeue script itself."""
    svc, _, _ = await make_service(sim_config(batches=1, calls_per_batch=1))
    await svc.queue.enqueue("crm", [(event(1, "d0"), 1)], max_backlog=0)
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = ReplyDropper(port)
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{await proxy.start()}/0")
    try:
        ops = Operations(svc.settings, svc.store, svc.leases, svc.registry,
                         DeliveryQueue(client, Keys()))  # fmt: skip
        # The reply to the replay's first request naming the letter waits a while:
        # whatever that request read, the letter changes before the replay goes on.
        proxy.slow(b"evt_d0_1", 0.3)
        replay = asyncio.create_task(ops.replay("crm", ["evt_d0_1"]))
        await proxy.holding.wait()
        # Meanwhile someone else's replay sent it, and it was delivered (unless this
        # replay's first request requeued it already: then it is on its way).
        record = Keys().delivery("crm", "evt_d0_1")
        delivered = await redis_client.hget(record, "state") == b"dead"
        if delivered:
            await redis_client.hset(record, "state", "delivered")
            await redis_client.zrem(Keys().dead("crm"), "evt_d0_1")
        await replay
        state = await redis_client.hget(record, "state")
        assert state == (b"delivered" if delivered else b"pending")
    finally:
        await client.aclose()
        await proxy.close()
