"""The receiving side's bad days, against real receivers and a real Redis: a receiver
that is down and comes back, one that hangs some requests, and the operational events
an on-call channel hears about them. The breaker's clock is short here (tens of ms);
the waits below are for that clock, never for work: work is awaited (`run_once`)."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from callbridge.store.keys import Keys
from tests.support.deliveries import MakeRig, Rig, event
from tests.support.event_schemas import violations
from tests.support.metrics import sample
from tests.support.receivers import Receiver
from tests.support.scenario import serve_on, until
from tests.support.servers import free_port
from tests.support.settings import SECRET

# The breaker opens after 3 attempts of which half failed, and pauses 50 ms.
BREAKER = {
    "breaker_min_attempts": 3,
    "breaker_cooloff_seconds": 0.05,
    "breaker_cooloff_max_seconds": 0.05,
}
# Fixed concurrency where a test needs several requests at once from the start.
RETRY_AT_ONCE = {"retry_schedule_seconds": [0, 0, 0], "adaptive_concurrency": False}
ONCALL = {"events": ["subscription.*", "delivery.dead_lettered"]}


async def half_open(rig: Rig, sub: str) -> bool:
    return (await rig.queue.endpoint(sub)).breaker == "half_open"


async def open_the_breaker(rig: Rig, sub: str, n: int = 3) -> None:
    rig.receivers[sub].default = 500
    await rig.enqueue(sub, *[event(i, f"c{i}") for i in range(n)])
    await rig.deliverer.run_once(sub)
    assert (await rig.queue.endpoint(sub)).breaker == "open"


async def test_a_failed_probe_costs_its_delivery_no_attempt(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {"max_in_flight": 3, **RETRY_AT_ONCE}}, **BREAKER)
    await open_the_breaker(rig, "crm")
    before = {f"evt_c{i}_{i}": (await rig.queue.record("crm", f"evt_c{i}_{i}")) for i in range(3)}
    attempts_before = {k: r["attempts"] for k, r in before.items() if r}
    await until(lambda: half_open(rig, "crm"))
    opened_until = (await rig.queue.endpoint("crm")).open_until_ms
    assert await rig.deliverer.run_once("crm") == 1  # one probe, still failing
    rec = rig.receivers["crm"]
    probe_id = rec.received[-1].id
    record = await rig.queue.record("crm", probe_id)
    assert record is not None
    assert record["attempts"] == attempts_before[probe_id]
    assert record["history"][-1]["outcome"] == "probe_failed"
    assert record["history"][-1]["probe"] is True
    assert record["state"] == "pending"
    assert (await rig.queue.endpoint("crm")).open_until_ms > opened_until  # reopened
    assert sample(rig.metrics, "delivery_attempts_total",
                  subscription="crm", outcome="probe_failed", status_class="5xx") == 1  # fmt: skip


async def test_only_a_probe_closes_an_open_breaker(make_rig: MakeRig) -> None:
    # A request sent before the breaker opened answers 200 late: that proves nothing
    # about the endpoint now (its probes keep failing), the breaker stays open.
    rig = await make_rig({"crm": {"max_in_flight": 4, **RETRY_AT_ONCE}}, **BREAKER)
    rec = rig.receivers["crm"]
    rec.default = 500
    rec.answers.append("hang")  # answers 200 once released
    await rig.enqueue("crm", *[event(i, f"c{i}") for i in range(4)])
    stopping = asyncio.Event()
    run = asyncio.create_task(rig.deliverer.run(stopping))
    try:
        await until(lambda: _breaker(rig, "crm", "open", "half_open"))
        rec.release.set()
        await until(lambda: _state(rig, "crm", "evt_c0_0", "delivered"))
        assert await _breaker(rig, "crm", "open", "half_open")
    finally:
        stopping.set()
        await run


async def test_recovery_makes_the_outage_backlog_due_at_once_in_event_order(
    make_rig: MakeRig,
) -> None:
    # Failed deliveries would wait an hour for their next attempt; the probe's success
    # makes them due at once, oldest event first.
    rig = await make_rig(
        {"crm": {"max_in_flight": 1, "retry_schedule_seconds": [3600, 3600]}, "oncall": ONCALL},
        **BREAKER,
    )
    rec = rig.receivers["crm"]
    rec.default = 500
    events = [event(i, f"c{i}") for i in range(6)]
    # Committed 10 ms apart, enqueued in reverse: promotion orders by commit time.
    await rig.queue.enqueue("crm", [(e, 1000 + 10 * i) for i, e in enumerate(events)][::-1])
    for _ in range(3):
        await rig.deliverer.run_once("crm")
    assert (await rig.queue.endpoint("crm")).breaker == "open"
    failed = {r.id for r in rec.received}
    assert len(failed) == 3
    depth = await rig.queue.depths("crm")
    assert depth["scheduled"] == 3  # an hour away
    rec.default = 200
    await until(lambda: half_open(rig, "crm"))
    await rig.deliverer.drain("crm")
    delivered = [r.id for r in rec.delivered]
    assert sorted(delivered) == sorted(e.id for e in events)
    # The probe first, then the rest in commit order (the three that had failed were
    # promoted ahead of the later ones that had waited in the due set).
    after_probe = delivered[1:]
    committed = {e.id: i for i, e in enumerate(events)}
    assert after_probe == sorted(after_probe, key=committed.__getitem__)
    assert (await rig.queue.depths("crm"))["scheduled"] == 0
    assert sample(rig.metrics, "delivery_promoted_total", subscription="crm") == 3
    # The on-call channel heard both ends of the outage, signed.
    await rig.deliverer.run_once("crm")  # hands the operational events on
    await rig.deliverer.drain("oncall")
    ops = rig.receivers["oncall"].verify_all(SECRET)
    kinds = [p["type"] for p in ops]
    assert kinds == ["subscription.breaker_opened", "subscription.recovered"]
    opened, recovered = (p["data"] for p in ops)
    assert opened["subscription"] == "crm"
    assert "of 3 attempts failed" in opened["reason"]
    assert recovered["failing_since"] == opened["failing_since"]
    # Each body is what the published catalog (docs/events/) says.
    assert all(not violations(r.body) for r in rig.receivers["oncall"].delivered)


async def test_disabled_and_dead_lettered_are_operational_events(make_rig: MakeRig) -> None:
    rig = await make_rig(
        {
            "crm": {"max_in_flight": 1, "retry_schedule_seconds": []},
            "erp": {"max_in_flight": 1},
            "oncall": ONCALL,
            "everything": {"events": ["*"]},
        }
    )
    rig.receivers["crm"].answers.append(500)  # no retries: dead at once
    rig.receivers["erp"].answers.append(410)
    await rig.enqueue("crm", event(1, "c1"))
    await rig.enqueue("erp", event(2, "c2"))
    await rig.deliverer.drain("crm")
    await rig.deliverer.drain("erp")
    await rig.deliverer.run_once("crm")
    await rig.deliverer.run_once("erp")
    await rig.deliverer.drain("oncall")
    await rig.deliverer.drain("everything")
    ops = rig.receivers["oncall"].verify_all(SECRET)
    by_type = {p["type"]: p["data"] for p in ops}
    assert set(by_type) == {"delivery.dead_lettered", "subscription.disabled"}
    dead = by_type["delivery.dead_lettered"]
    assert (dead["subscription"], dead["event_id"], dead["event_type"]) == (
        "crm", "evt_c1_1", "call.completed",
    )  # fmt: skip
    assert dead["attempts"] == 1
    assert dead["last_error"] == "HTTP 500"
    assert by_type["subscription.disabled"]["subscription"] == "erp"
    assert "410" in by_type["subscription.disabled"]["reason"]
    assert all(not violations(r.body) for r in rig.receivers["oncall"].delivered)
    # "*" means the call events, not the operational ones.
    assert rig.receivers["everything"].received == []
    # Handing on again creates nothing new (ids come from the stream entries).
    ids = {r.id for r in rig.receivers["oncall"].received}
    await rig.deliverer.run_once("crm")
    await rig.deliverer.drain("oncall")
    assert {r.id for r in rig.receivers["oncall"].received} == ids


async def test_an_on_call_endpoint_never_hears_about_itself(make_rig: MakeRig) -> None:
    rig = await make_rig({"oncall": {**ONCALL, "retry_schedule_seconds": []}, "crm": {}})
    rig.receivers["oncall"].default = 500
    rig.receivers["crm"].answers.append(410)
    await rig.enqueue("crm", event(1))
    await rig.deliverer.drain("crm")
    await rig.deliverer.run_once("crm")  # subscription.disabled -> oncall
    await rig.deliverer.drain("oncall")  # fails, dead-lettered
    await rig.deliverer.run_once("oncall")
    await rig.deliverer.drain("oncall")
    # One request: the disabled event; its dead letter was not sent back to it.
    assert len(rig.receivers["oncall"].received) == 1
    assert (await rig.queue.dead_count("oncall")) == 1


async def refuse_until_open(rig: Rig, sub: str) -> None:
    """Attempts against a port nothing listens on until the breaker opens."""
    for _ in range(3):
        await rig.deliverer.run_once(sub)
        if (await rig.queue.endpoint(sub)).breaker != "closed":
            break
    assert (await rig.queue.endpoint(sub)).breaker == "open"


async def test_a_delivery_waiting_out_an_outage_longer_than_its_schedule_dies(
    make_rig: MakeRig,
) -> None:
    # Schedule of 50 ms in all: while the breaker is open, what has waited longer is a
    # dead letter (replayable), not a delivery kept forever.
    rig = await make_rig(
        {
            "crm": {
                "max_in_flight": 3,
                "retry_schedule_seconds": [0.05],
                "adaptive_concurrency": False,
            }
        },
        breaker_min_attempts=3,
        breaker_cooloff_seconds=60,
        breaker_cooloff_max_seconds=60,
    )
    await open_the_breaker(rig, "crm")
    await rig.enqueue("crm", event(9, "late"))
    await until(lambda: _run_until_state(rig, "crm", "evt_late_9", "dead"))
    record = await rig.queue.record("crm", "evt_late_9")
    assert record is not None
    assert record["state"] == "dead"
    assert record["attempts"] == 1
    assert "longer than the retry schedule" in record["history"][-1]["error"]
    # Counted like any other dead letter (item 13: only an attempt's own outcome was).
    # (Those that opened the breaker die by age too, some by now.)
    dead = await rig.queue.dead_count("crm")
    assert dead >= 1
    assert sample(rig.metrics, "dead_letters_total", subscription="crm") == dead


async def test_hung_requests_do_not_hold_the_backlog(make_rig: MakeRig) -> None:
    # One request in ten hangs until its 3 s timeout; with 4 slots, the other 36 must
    # not wait behind them (each hung one is detached once it has run 0.5 s).
    rig = await make_rig({"crm": {"max_in_flight": 4, "timeout_seconds": 3}})
    rec = rig.receivers["crm"]
    await rig.enqueue("crm", *[event(1, f"warm{i}") for i in range(16)])
    await rig.deliverer.drain("crm")  # learns the receiver's usual latency
    for i in range(40):
        rec.answers.append("hang" if i % 10 == 0 else 200)
    await rig.enqueue("crm", *[event(2, f"c{i}") for i in range(40)])
    stopping = asyncio.Event()
    started = time.monotonic()
    run = asyncio.create_task(rig.deliverer.run(stopping))
    try:
        await until(lambda: _true(len(rec.delivered) >= 16 + 36), within_s=2.8)
        took = time.monotonic() - started
    finally:
        rec.release.set()
        stopping.set()
        await run
    assert took < 2.5
    assert sample(rig.metrics, "delivery_detached_total", subscription="crm") >= 1


async def _true(value: bool) -> bool:
    return value


async def _breaker(rig: Rig, sub: str, *states: str) -> bool:
    return (await rig.queue.endpoint(sub)).breaker in states


async def _state(rig: Rig, sub: str, event_id: str, state: str) -> bool:
    record = await rig.queue.record(sub, event_id)
    return record is not None and record["state"] == state


async def _run_until_state(rig: Rig, sub: str, event_id: str, state: str) -> bool:
    await rig.deliverer.run_once(sub)
    return await _state(rig, sub, event_id, state)


async def test_the_outage_leaves_the_failure_window_with_the_recovery(make_rig: MakeRig) -> None:
    # Judged by the outage's failures, the first ordinary failure after the return would
    # open the breaker again at once (a 503 outage then lasted twice as long).
    rig = await make_rig({"crm": {"max_in_flight": 3, **RETRY_AT_ONCE}}, **BREAKER)
    await open_the_breaker(rig, "crm")
    rec = rig.receivers["crm"]
    rec.default = 200
    await until(lambda: half_open(rig, "crm"))
    await rig.deliverer.drain("crm")
    assert (await rig.queue.endpoint("crm")).breaker == "closed"
    rec.answers.append(500)
    await rig.enqueue("crm", event(7, "after"))
    await rig.deliverer.run_once("crm")
    assert rec.received[-1].id == "evt_after_7"
    assert (await rig.queue.endpoint("crm")).breaker == "closed"


async def test_a_promoted_delivery_failing_again_retries_at_the_first_delay(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    # Promoted at the return, a delivery that failed during the outage fails once more:
    # scheduled by its attempt count it waited the schedule's later tier (300 s by
    # default; an hour here) although the endpoint had just come back. Once per
    # recovery it takes the first delay instead.
    rig = await make_rig(
        {"crm": {"max_in_flight": 3, "adaptive_concurrency": False,
                 "retry_schedule_seconds": [1, 3600, 3600]}},
        **BREAKER,
    )  # fmt: skip
    await open_the_breaker(rig, "crm")  # each of the three failed once
    rec = rig.receivers["crm"]
    rec.default = 200
    rec.answers.extend([200, 500])  # the probe answers, the first promoted one fails
    await rig.enqueue("crm", event(3, "c3"))  # due now: the probe (the rest wait 1 s)
    await until(lambda: half_open(rig, "crm"))
    await rig.deliverer.run_once("crm")  # the probe: recovered, the others promoted
    for _ in range(5):  # promotion, then the promoted three
        if len(rec.received) == 7:
            break
        await rig.deliverer.run_once("crm")
    assert len(rec.received) == 7
    (refailed,) = {r.id for r in rec.received} - {r.id for r in rec.delivered}
    record = await rig.queue.record("crm", refailed)
    assert record is not None
    assert record["attempts"] == 2
    assert record["state"] == "pending"
    now_ms = (await rig.queue.endpoint("crm")).now_ms
    assert record["next_attempt_ms"] is not None
    assert record["next_attempt_ms"] - now_ms <= 1200  # the first delay (+-20%), not 3600 s
    # Only once per recovery: failing again without a new outage, it is on its tier.
    await redis_client.zadd(Keys().due("crm"), {refailed: 0})
    rec.answers.append(500)
    await rig.deliverer.run_once("crm")
    record = await rig.queue.record("crm", refailed)
    assert record is not None
    assert record["attempts"] == 3
    assert record["next_attempt_ms"] - (await rig.queue.endpoint("crm")).now_ms > 3000_000


async def test_a_probe_answered_with_an_error_ends_an_outage_of_refused_connections(
    make_rig: MakeRig,
) -> None:
    # The breaker opened because nothing listened. The CRM is back and fails a fifth of
    # first attempts on its own: a probe that drew one of those (a 500) was a failed
    # probe, the breaker paused again, and the backlog waited another pause per unlucky
    # probe (4.9 s after the return in the 10-minute outage bench). An HTTP answer
    # proves the endpoint reachable: the breaker closes, and the 500 is an ordinary
    # failed attempt of its delivery.
    port = free_port()
    rig = await make_rig(
        {"crm": {"url": f"http://127.0.0.1:{port}/hook", "max_in_flight": 3,
                 "retry_schedule_seconds": [3600, 3600]}},
        breaker_failure_threshold=2,
        **BREAKER,
    )  # fmt: skip
    await rig.enqueue("crm", *[event(i, f"c{i}") for i in range(4)])
    await refuse_until_open(rig, "crm")
    back = Receiver()
    back.answers.append(500)  # the probe draws one of its own failures
    runner = await serve_on(back.app(), port)
    try:
        await until(lambda: half_open(rig, "crm"))
        assert await rig.deliverer.run_once("crm") == 1  # the probe
        assert (await rig.queue.endpoint("crm")).breaker == "closed"
        probe_id = back.received[0].id
        record = await rig.queue.record("crm", probe_id)
        assert record is not None
        assert record["history"][-1]["outcome"] == "retry"  # an attempt like any other
        await rig.deliverer.drain("crm")
        # The rest went at once (the outage's failures promoted), not after pauses; the
        # probe's own delivery with them (it failed within the outage's streak).
        assert {r.id for r in back.delivered} == {f"evt_c{i}_{i}" for i in range(4)}
    finally:
        await runner.cleanup()


async def test_a_probe_that_times_out_is_still_a_failed_probe(make_rig: MakeRig) -> None:
    # No answer is no proof: a hung probe leaves the breaker open.
    port = free_port()
    rig = await make_rig(
        {"crm": {"url": f"http://127.0.0.1:{port}/hook", "max_in_flight": 3,
                 "timeout_seconds": 0.2}},
        breaker_failure_threshold=2,
        **BREAKER,
    )  # fmt: skip
    await rig.enqueue("crm", *[event(i, f"c{i}") for i in range(3)])
    await refuse_until_open(rig, "crm")
    back = Receiver()
    back.answers.append("hang")
    runner = await serve_on(back.app(), port)
    try:
        await until(lambda: half_open(rig, "crm"))
        assert await rig.deliverer.run_once("crm") == 1
        assert (await rig.queue.endpoint("crm")).breaker == "open"
    finally:
        back.release.set()
        await runner.cleanup()


async def test_a_reaching_probe_whose_delivery_dies_is_counted_as_a_dead_letter(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    # The probe reaches the endpoint (an HTTP 500 after refused connections) on its
    # delivery's last attempt: the breaker closes and the delivery is a dead letter,
    # counted like every other (the script answered 'recovered' for it).
    port = free_port()
    rig = await make_rig(
        {"crm": {"url": f"http://127.0.0.1:{port}/hook", "retry_schedule_seconds": [3600]}},
        breaker_failure_threshold=1,
        **BREAKER,
    )
    await rig.enqueue("crm", event(0, "c0"))
    await refuse_until_open(rig, "crm")  # its first attempt: refused
    await redis_client.zadd(Keys().due("crm"), {"evt_c0_0": 0})  # due for the probe
    back = Receiver()
    back.default = 500
    runner = await serve_on(back.app(), port)
    try:
        await until(lambda: half_open(rig, "crm"))
        assert await rig.deliverer.run_once("crm") == 1
        assert (await rig.queue.endpoint("crm")).breaker == "closed"
        assert await rig.queue.dead_count("crm") == 1
        assert sample(rig.metrics, "dead_letters_total", subscription="crm") == 1
    finally:
        await runner.cleanup()
