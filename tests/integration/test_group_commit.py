"""A scan commits its pages in groups while it reads the rest (`group_commit.py`):
what its first pages showed is committed, and fanned out, before its last page
arrives; the last group alone carries batch-level facts."""

from __future__ import annotations

import asyncio

from callbridge.app import Bridge
from callbridge.simulator import Simulator
from tests.support.bridges import MakeService, sim_config
from tests.support.gates import PageGate


async def rig(make_service: MakeService, gate: PageGate) -> tuple[Bridge, Simulator, str]:
    svc, sim, _ = await make_service(
        sim_config(batches=1, calls_per_batch=6),
        upstream={"page_size": 2},  # three pages
        upstream_middlewares=[gate.middleware],
    )
    batch = sim.batch_ids[0]
    assert await svc.poller.poll_once(batch) == "committed"  # all pending, silently
    return svc, sim, batch


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
    svc, sim, batch = await rig(make_service, gate)
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
    svc, sim, batch = await rig(make_service, gate)
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
