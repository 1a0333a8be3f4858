"""Backward moves through the whole poll cycle: a redial whose terminal status was
seen is confirmed by a second look, however the looks are spread (a scan that
missed the call, a page that did not change, a restart or take-over in between),
and a stale copy is never confirmed by a look from another release's commit.

Statuses are set by hand on a simulator that does not move on its own; each cycle
is awaited; events are read from the batch's timeline (what was committed).
"""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from callbridge.app import Bridge
from callbridge.simulator import Simulator
from callbridge.store.keys import Keys
from tests.support.bridges import MakeService, sim_config
from tests.support.gates import PageGate

T1 = "2026-01-01T10:00:00Z"
T2 = "2026-01-01T10:05:00Z"


async def rig(make_service: MakeService, gate: PageGate | None = None) -> tuple[Bridge, Simulator]:
    svc, sim, _ = await make_service(
        # Nothing moves unless the test says so (no clock runs); two calls per page.
        sim_config(batches=1, calls_per_batch=4),
        upstream={"page_size": 2},
        upstream_middlewares=[gate.middleware] if gate else [],
    )
    return svc, sim


async def events(svc: Bridge, batch: str, call: str) -> list[tuple[str, int]]:
    return [
        (e["event_type"], e["sequence"])
        for e in await svc.store.timeline(batch, call)
        if e["event_type"] is not None
    ]


async def busy_then_queued(svc: Bridge, sim: Simulator) -> tuple[str, str]:
    """A call seen busy, then served queued once (a redial, or a stale copy)."""
    batch = sim.batch_ids[0]
    call = sim.calls(batch)[3]["call_id"]  # on page 2
    sim.set_call(batch, call, status="busy", started_at=T1, ended_at=T1, duration_seconds=0)
    assert await svc.poller.poll_once(batch) == "committed"
    assert await events(svc, batch, call) == [("call.busy", 1)]
    sim.set_call(batch, call, status="queued", started_at=None, ended_at=None)
    await svc.poller.poll_once(batch)
    assert await events(svc, batch, call) == [("call.busy", 1)]  # one look: not yet
    return batch, call


async def test_a_second_look_confirms_the_redial(make_service: MakeService) -> None:
    svc, sim = await rig(make_service)
    batch, call = await busy_then_queued(svc, sim)
    neighbour = sim.calls(batch)[2]["call_id"]  # its page changes too
    sim.set_call(batch, neighbour, status="ringing")
    await svc.poller.poll_once(batch)
    assert await events(svc, batch, call) == [("call.busy", 1), ("call.queued", 2)]


async def test_a_scan_that_missed_the_call_does_not_reset_the_count(
    make_service: MakeService,
) -> None:
    gate = PageGate()
    svc, sim = await rig(make_service, gate)
    batch, call = await busy_then_queued(svc, sim)
    gate.failing = {"2"}
    assert await svc.poller.poll_once(batch) == "partial"
    gate.failing = set()
    await svc.poller.poll_once(batch)
    assert await events(svc, batch, call) == [("call.busy", 1), ("call.queued", 2)]


async def test_a_page_that_did_not_change_is_looked_at_again(make_service: MakeService) -> None:
    """Nothing else on the page moved: its bytes are those of the last scan, and the
    call on it must still get its second look."""
    svc, sim = await rig(make_service)
    batch, call = await busy_then_queued(svc, sim)
    await svc.poller.poll_once(batch)  # the page is byte for byte what it was
    assert await events(svc, batch, call) == [("call.busy", 1), ("call.queued", 2)]


@pytest.mark.parametrize("moved_on", [False, True])
async def test_the_first_look_survives_a_take_over(
    make_service: MakeService, moved_on: bool
) -> None:
    """The replica that had the first look is gone (its cache dropped, the batch loaded
    again from Redis, as after a take-over or a restart). If the call moved on
    meanwhile, what the first look saw is reported first."""
    svc, sim = await rig(make_service)
    batch, call = await busy_then_queued(svc, sim)
    rt = svc.poller.runtime(batch)
    assert rt is not None
    rt.drop_cache()
    if moved_on:
        sim.set_call(batch, call, status="ringing")
    await svc.poller.poll_once(batch)
    expected = [("call.busy", 1), ("call.queued", 2)]
    assert await events(svc, batch, call) == (
        [*expected, ("call.ringing", 3)] if moved_on else expected
    )


@pytest.mark.parametrize(
    ("started_at", "ended_at"),
    [(T2, T2), (T1, T2)],
    ids=["another start time", "same start, another end"],
)
async def test_another_attempt_confirms_the_redial(
    make_service: MakeService, started_at: str, ended_at: str
) -> None:
    """Seen queued once, then busy again in another attempt: another start time, or the
    same one (a call never answered may carry none, or keep its first one) with another
    end time (it ended again). The redial was real: both its statuses are reported."""
    svc, sim = await rig(make_service)
    batch, call = await busy_then_queued(svc, sim)
    ended = {"started_at": started_at, "ended_at": ended_at, "duration_seconds": 0}
    sim.set_call(batch, call, status="busy", **ended)
    await svc.poller.poll_once(batch)
    assert await events(svc, batch, call) == [
        ("call.busy", 1),
        ("call.queued", 2),
        ("call.busy", 3),
    ]


async def test_ending_otherwise_confirms_the_redial(make_service: MakeService) -> None:
    """Seen queued once, then failed: a finished call changes only when redialled, so
    the first look was real (its second look may have died with another replica)."""
    svc, sim = await rig(make_service)
    batch, call = await busy_then_queued(svc, sim)
    sim.set_call(batch, call, status="failed")
    await svc.poller.poll_once(batch)
    assert await events(svc, batch, call) == [
        ("call.busy", 1),
        ("call.queued", 2),
        ("call.failed", 3),
    ]


async def test_back_where_we_knew_it_forgets_the_first_look(make_service: MakeService) -> None:
    """A stale copy, then the call as we knew it: a later backward copy is a first
    look again, not a second one."""
    svc, sim = await rig(make_service)
    batch, call = await busy_then_queued(svc, sim)
    sim.set_call(batch, call, status="busy", started_at=T1, ended_at=T1, duration_seconds=0)
    await svc.poller.poll_once(batch)
    sim.set_call(batch, call, status="queued", started_at=None, ended_at=None)
    await svc.poller.poll_once(batch)
    assert await events(svc, batch, call) == [("call.busy", 1)]


async def test_a_first_look_from_before_another_releases_commit_is_not_trusted(
    make_service: MakeService, redis_client: Redis[Any]
) -> None:
    """A replica of an older release commits without first looks: the ones stored
    before are no longer known to hold, and a new owner starts counting again."""
    svc, sim = await rig(make_service)
    batch, call = await busy_then_queued(svc, sim)
    assert (await svc.store.load_meta(batch)).suspects  # stored with the commit
    await redis_client.hset(Keys().batch_meta(batch), "commit_id", "an-older-release")
    rt = svc.poller.runtime(batch)
    assert rt is not None
    rt.drop_cache()
    assert (await svc.store.load_meta(batch)).suspects == []
    await svc.poller.poll_once(batch)
    assert await events(svc, batch, call) == [("call.busy", 1)]
