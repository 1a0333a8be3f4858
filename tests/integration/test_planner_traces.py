"""What the planner benchmark's traces (`bench.explain`) showed, each case reproduced:
real bridges against the simulator (moved by a middleware at chosen moments of a cycle:
right after the page at the dialler's frontier), real Valkey.

Losses: statuses the active plan's reads served twice in one cycle are reported,
whatever the cycle does next. Late events: a redial that started and ended between two
polls is found by the page at the frontier when it is near."""

from __future__ import annotations

from typing import Any

from tests.integration.test_planner_plans import (
    BATCH,
    Clock,
    bridge,
    events_of,
    frontier_rig,
    plan_of,
    simulator,
)
from tests.support.gates import after_unfiltered_page


async def test_a_redial_served_twice_is_reported_though_it_moved_on_before_the_look_up(
    redis_url: str, redis_client: Any, aiohttp_server: Any
) -> None:
    """Seen ringing; ended unseen (busy) and redialled: its queued list and the frontier
    page serve it queued, then it rings again before the cycle's look-up of it (the
    second look a backward move needs). The look-up shows it ringing: the two answers
    going back were the redial all the same, reported by the next cycle, before what it
    shows. Benchmark trace: queued served by ``status=queued p1/500`` and
    ``page 35/500``, ringing by ``lookup 17329``, then only ``call.updated`` arrived."""
    rig = await frontier_rig(aiohttp_server, redis_url)
    sim, x, y, fields = rig.sim, rig.x, rig.y, rig.after_frontier
    svc, poller, receiver = rig.svc, rig.poller, rig.receiver
    try:
        assert await plan_of(poller) == "full:cold"
        sim.set_call(BATCH, x, status="ringing")
        sim.set_call(BATCH, y, status="ringing")
        assert await plan_of(poller) == "active:configured"
        sim.set_call(BATCH, x, status="busy", ended_at="2026-11-30T10:00:00.000Z")
        sim.set_call(BATCH, x, status="queued")
        sim.set_call(BATCH, y, status="no_answer")  # vanishes: the frontier page is read
        fields.update(status="ringing")
        seen = len(sim.request_log)
        assert await plan_of(poller) == "active:configured"
        assert not fields, "the frontier page was read"
        paths = [path for _, path, _ in sim.request_log[seen:]]
        assert any("external_id=" in p for p in paths), paths  # the look-up: ringing
        assert await plan_of(poller) == "active:configured"
        await svc.deliverer.drain()
        assert events_of(receiver, x) == [
            ("call.ringing", "pending", False),
            ("call.queued", "ringing", True),
            ("call.ringing", "queued", False),
        ]
    finally:
        await svc.close()


async def test_a_status_served_twice_survives_a_fall_back_to_a_full_scan(
    redis_url: str, redis_client: Any, aiohttp_server: Any
) -> None:
    """The ringing list and the frontier page serve a call ringing; then the cycle falls
    back to a full scan (resolving what vanished would cost more), whose page serves it
    answered. What the active reads served twice is committed before the full scan.
    Benchmark trace: ringing served by ``status=ringing p1/500`` and ``page 1/500``,
    answered by the fall-back's ``page 1/500``; ``call.answered`` arrived skipping
    ringing."""
    sim = simulator(40)
    calls = [c["call_id"] for c in sim.calls(BATCH)]
    x, far = calls[3], calls[30:33]
    for call in calls[:3]:  # the frontier page, ending at the first call still pending
        sim.set_call(BATCH, call, status="completed")  # (the 5th), holds x
    fields: dict[str, Any] = {}
    clock = Clock()
    svc, poller, receiver = await bridge(
        aiohttp_server,
        redis_url,
        sim,
        clock=clock,
        middleware=after_unfiltered_page(sim, BATCH, x, fields),
    )
    try:
        assert await plan_of(poller) == "full:cold"
        for call in far:
            sim.set_call(BATCH, call, status="ringing")
        clock.now += 2
        assert await plan_of(poller) == "active:cheaper"
        # Three calls vanish far from the frontier: three look-ups, more than the
        # budget (a full scan's 8 pages) leaves after the lists and the frontier page.
        for call in far:
            sim.set_call(BATCH, call, status="completed")
        sim.set_call(BATCH, x, status="ringing")
        fields.update(status="answered")
        clock.now += 2
        assert await plan_of(poller) == "full:costly"
        assert not fields, "the frontier page was read"
        await svc.deliverer.drain()
        assert events_of(receiver, x) == [
            ("call.ringing", "pending", False),
            ("call.answered", "ringing", False),
        ]
        for call in far:
            assert events_of(receiver, call) == [
                ("call.ringing", "pending", False),
                ("call.completed", "ringing", False),
            ]
    finally:
        await svc.close()


async def test_a_redial_that_ended_between_two_polls_is_found_at_the_frontier(
    redis_url: str, redis_client: Any, aiohttp_server: Any
) -> None:
    """Seen ending (no_answer), redialled and ended again (completed) between two polls:
    no list shows it, the counts do not either (one finished call for another). The
    page the cycle reads at the dialler's frontier reaches back as far as its limit
    allows (the same request), so it serves the call completed. Benchmark trace: the
    call at page 7/500 served no_answer, redialled and completed 1.1 s later; the next
    frontier pages were 8/475, 8/484, 8/500 (from 3,325 on, the call before that); the
    periodic full scan found it 235 s later."""
    sim = simulator(60)
    calls = [c["call_id"] for c in sim.calls(BATCH)]
    x = calls[16]
    svc, poller, receiver = await bridge(
        aiohttp_server, redis_url, sim, scan="active", page_size=20
    )
    try:
        assert await plan_of(poller) == "full:cold"
        for call in calls[:20]:
            sim.set_call(BATCH, call, status="ringing")
        assert await plan_of(poller) == "active:configured"
        for call in calls[:20]:
            sim.set_call(BATCH, call, status="no_answer", ended_at="2026-11-30T10:00:00.000Z")
        assert await plan_of(poller) == "active:configured"
        sim.set_call(BATCH, x, status="queued")
        sim.set_call(BATCH, x, status="completed", ended_at="2026-11-30T10:00:02.000Z")
        # The dialler goes on: one call on a line, eight more ended unseen.
        sim.set_call(BATCH, calls[20], status="ringing")
        for call in calls[21:29]:
            sim.set_call(BATCH, call, status="busy")
        seen = len(sim.request_log)
        assert await plan_of(poller) == "active:configured"
        pages = [p for _, p, _ in sim.request_log[seen:] if "status=" not in p]
        assert len(pages) == 1, pages  # the frontier page, and nothing else of the list
        await svc.deliverer.drain()
        assert events_of(receiver, x) == [
            ("call.ringing", "pending", False),
            ("call.no_answer", "ringing", False),
            ("call.completed", "no_answer", False),
        ]
    finally:
        await svc.close()


async def test_the_frontier_page_ends_past_the_first_call_still_pending(
    redis_url: str, redis_client: Any, aiohttp_server: Any
) -> None:
    """Calls that left pending unseen are found in the page at the frontier, the last
    of them too: the page ends past the call the pending probe served first, however
    many of those before it the active lists showed. Without that, the page reaching
    back ended too early and the terminal lists were read (the benchmark: 22 % more
    requests)."""
    sim = simulator(60)
    calls = [c["call_id"] for c in sim.calls(BATCH)]
    svc, poller, receiver = await bridge(
        aiohttp_server, redis_url, sim, scan="active", page_size=20
    )
    try:
        assert await plan_of(poller) == "full:cold"
        sim.set_call(BATCH, calls[0], status="busy")  # ended unseen
        for call in calls[1:8]:
            sim.set_call(BATCH, call, status="ringing")
        sim.set_call(BATCH, calls[8], status="no_answer")  # ended unseen
        seen = len(sim.request_log)
        assert await plan_of(poller) == "active:configured"
        paths = [p for _, p, _ in sim.request_log[seen:]]
        # The pending probe, the four active lists, the frontier page: nothing more.
        assert len(paths) == 6, paths
        await svc.deliverer.drain()
        assert events_of(receiver, calls[0]) == [("call.busy", "pending", False)]
        assert events_of(receiver, calls[8]) == [("call.no_answer", "pending", False)]
    finally:
        await svc.close()
