"""A batch event comes after its batch's call events (issue 23, item 16).

In `callbridge demo` a `batch.completed` (counting a call as failed) was delivered
before that call's `call.failed`: the call event waited behind the call's previous
event (per-call order) while the batch event, in no chain, went at once. A CRM that
closes a campaign on `batch.completed` then received a call of a closed campaign.
Now a batch event waits until every call event of its batch enqueued before it has
had its first attempt. Real Redis, real receivers; work is awaited (`run_once`,
`drain`), never slept for.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from callbridge.models import Event
from callbridge.store.keys import Keys
from tests.support.deliveries import MakeRig, event

AT_ONCE = {"max_in_flight": 8, "adaptive_concurrency": False}


def batch_completed(batch: str = "b1", n: int = 1) -> Event:
    return Event.build(
        event_id=f"evt_{batch}_done_{n}",
        type="batch.completed",
        timestamp="2026-11-28T10:00:09.000Z",
        batch_id=batch,
        call_id=None,
        data={"batch_id": batch, "counts": {"completed": 1, "failed": 1}},
    )


def other_batch(n: int, call: str) -> Event:
    e = event(n, call)
    return Event(id=f"evt_b2_{call}_{n}", type=e.type, batch_id="b2", call_id=call, body=e.body)


async def test_batch_completed_waits_for_the_first_attempt_of_its_calls_events(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig({"crm": AT_ONCE})
    rec = rig.receivers["crm"]
    # x: ringing then failed (failed waits behind ringing's first attempt); y: completed.
    x1, x2 = event(1, "x", "call.ringing"), event(2, "x", "call.failed")
    y1 = event(1, "y", "call.completed")
    done = batch_completed()
    await rig.enqueue("crm", x1, x2, y1, done)
    await rig.deliverer.run_once("crm")
    # The first step sends x1 and y1 only: x2 waits for x1, the batch event for x2.
    assert sorted(r.id for r in rec.received) == sorted([x1.id, y1.id])
    await rig.deliverer.drain("crm")
    order = [r.id for r in rec.received]
    assert sorted(order) == sorted([x1.id, x2.id, y1.id, done.id])
    assert order[-1] == done.id
    assert order.index(x2.id) < order.index(done.id)


async def test_a_failed_first_attempt_releases_the_batch_event_too(make_rig: MakeRig) -> None:
    # "First attempt", not "delivered": a call event that fails and waits for its
    # retry does not hold the batch event back (as per-call order does not).
    rig = await make_rig({"crm": {**AT_ONCE, "retry_schedule_seconds": [3600]}})
    rec = rig.receivers["crm"]
    rec.answers.append(500)
    x1, done = event(1, "x", "call.failed"), batch_completed()
    await rig.enqueue("crm", x1, done)
    await rig.deliverer.run_once("crm")  # x1 fails
    assert [r.id for r in rec.received] == [x1.id]
    await rig.deliverer.drain("crm")
    assert [r.id for r in rec.delivered] == [done.id]
    record = await rig.queue.record("crm", x1.id)
    assert record is not None
    assert record["state"] == "pending"
    assert record["attempts"] == 1


async def test_other_batches_and_later_events_do_not_hold_it(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": AT_ONCE})
    rec = rig.receivers["crm"]
    # Enqueued after the batch event: a redial of the batch, and another batch's calls.
    done = batch_completed()
    await rig.enqueue("crm", done)
    await rig.enqueue("crm", event(3, "x", "call.ringing"), other_batch(1, "z"))
    await rig.deliverer.run_once("crm")
    assert done.id in {r.id for r in rec.received}
    # Nothing is left behind in the chain hash once everything had its first attempt.
    await rig.deliverer.drain("crm")
    assert len(rec.delivered) == 3


async def test_a_batch_event_held_past_its_bound_is_freed_by_the_sweep(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    # During a rolling upgrade a previous release's replica attempts call deliveries
    # without counting them down: the count never reaches 0. The sweep frees the
    # batch event after its bound (10 min by default; 0 here).
    rig = await make_rig({"crm": AT_ONCE})
    rec = rig.receivers["crm"]
    done = batch_completed()
    await rig.enqueue("crm", event(1, "x", "call.failed"), done)
    await redis_client.hincrby(Keys().chain("crm"), "#b1", 5)  # never counted down
    await rig.deliverer.drain("crm")
    assert [r.id for r in rec.delivered] == ["evt_x_1"]
    assert await rig.queue.sweep("crm", dead_retention_ms=60_000) == 0
    await rig.deliverer.drain("crm")
    assert [r.id for r in rec.delivered] == ["evt_x_1"]  # within its bound: still held
    await rig.queue.sweep("crm", dead_retention_ms=60_000, hold_max_ms=0)
    await rig.deliverer.drain("crm")
    assert [r.id for r in rec.delivered] == ["evt_x_1", done.id]


async def test_the_count_is_gone_once_the_batch_is_through(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    rig = await make_rig({"crm": AT_ONCE})
    await rig.enqueue("crm", event(1, "x"), event(1, "y"), batch_completed())
    chain = Keys().chain("crm")
    assert await redis_client.hget(chain, "#b1") == b"2"
    await rig.deliverer.drain("crm")
    assert len(rig.receivers["crm"].delivered) == 3
    assert await redis_client.hkeys(chain) == []
