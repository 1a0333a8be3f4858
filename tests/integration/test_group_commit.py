"""A scan commits its pages in groups while it reads the rest (`group_commit.py`):
what its first pages showed is committed, and fanned out, before its last page
arrives; the last group alone carries batch-level facts."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from callbridge.app import Bridge
from callbridge.simulator import Simulator
from callbridge.store.keys import Keys
from tests.support.bridges import MakeService, sim_config
from tests.support.gates import PageGate
from tests.support.receivers import Receiver
from tests.support.settings import SECRET


async def rig(make_service: MakeService, gate: PageGate) -> tuple[Bridge, Simulator, str, Receiver]:
    svc, sim, receiver = await make_service(
        sim_config(batches=1, calls_per_batch=6),
        upstream={"page_size": 2},  # three pages
        upstream_middlewares=[gate.middleware],
    )
    batch = sim.batch_ids[0]
    assert await svc.poller.poll_once(batch) == "committed"  # all pending, silently
    return svc, sim, batch, receiver


async def settled(svc: Bridge, batch: str) -> None:
    """Until the groups of pages handed over so far are committed."""
    rt = svc.poller.runtime(batch)
    assert rt is not None
    assert rt.group is not None
    await rt.group.settled()


async def statuses(svc: Bridge, batch: str, call: str) -> list[str | None]:
    return [e["event_type"] for e in await svc.store.timeline(batch, call)]


async def test_first_pages_are_committed_while_the_last_is_read(
    make_service: MakeService,
) -> None:
    gate = PageGate()
    svc, sim, batch, _ = await rig(make_service, gate)
    first, last = sim.calls(batch)[0]["call_id"], sim.calls(batch)[5]["call_id"]
    for call in (first, last):
        sim.set_call(batch, call, status="queued")
    gate.held = {"3"}
    cycle = asyncio.create_task(svc.poller.poll_once(batch))
    await gate.asked.wait()
    await settled(svc, batch)
    # Page 3 is still being read; page 1's change is committed.
    meta = await svc.store.load_meta(batch)
    try:
        assert await statuses(svc, batch, first) == [None, "call.queued"]
        assert await statuses(svc, batch, last) == [None]
        assert not meta.completed
    finally:
        gate.release()
    assert await cycle == "committed"
    assert await statuses(svc, batch, last) == [None, "call.queued"]


async def test_batch_completed_waits_for_the_whole_scan(make_service: MakeService) -> None:
    """Every call ends; the first groups see only some of them, so only the scan's
    final commit may complete the batch, once."""
    gate = PageGate()
    svc, sim, batch, _ = await rig(make_service, gate)
    for item in sim.calls(batch):
        sim.set_call(batch, item["call_id"], status="completed")
    gate.held = {"3"}
    cycle = asyncio.create_task(svc.poller.poll_once(batch))
    await gate.asked.wait()
    await settled(svc, batch)
    done_early = (await svc.store.load_meta(batch)).completed
    gate.release()
    assert await cycle == "committed"
    meta = await svc.store.load_meta(batch)
    assert (done_early, meta.completed, meta.completions) == (False, True, 1)


async def test_a_failed_fan_out_stops_the_later_groups_and_the_next_cycle_drains_in_order(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """Groups are fanned out in the background, in commit order (`fanout.FanOut`): when
    the first group's fan-out fails, the later groups still commit, but none of their
    events is queued ahead of the first group's; the cycle logs the failure, and the
    next one queues everything from the outbox, each call's events in order."""
    gate = PageGate()
    svc, sim, batch, receiver = await rig(make_service, gate)
    for item in sim.calls(batch):
        sim.set_call(batch, item["call_id"], status="queued")
    due = Keys().due("crm")
    await redis_client.set(due, "not a sorted set")  # the subscription's queue is broken
    gate.held = {"3"}
    cycle = asyncio.create_task(svc.poller.poll_once(batch))
    await gate.asked.wait()
    await settled(svc, batch)  # page 1's group committed, its fan-out failing
    gate.release()
    assert await cycle == "committed"  # the failed fan-out is logged, not raised
    # Every group committed; nothing was taken from the outbox.
    assert await redis_client.xlen(Keys().outbox(batch)) == 6
    for item in sim.calls(batch):
        sim.set_call(batch, item["call_id"], status="ringing")
    await redis_client.delete(due)
    assert await svc.poller.poll_once(batch) == "committed"
    assert await redis_client.xlen(Keys().outbox(batch)) == 0
    await svc.deliverer.drain()
    received = [p for p in receiver.verify_all(SECRET) if p["type"].startswith("call.")]
    by_call: dict[str, list[str]] = {}
    for p in received:
        by_call.setdefault(p["data"]["call_id"], []).append(p["type"])
    assert by_call == {c["call_id"]: ["call.queued", "call.ringing"] for c in sim.calls(batch)}
