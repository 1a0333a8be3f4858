"""Delivery against real local receivers and a real Redis; signatures checked by
the reference standardwebhooks implementation. Every test runs with both HTTP
clients (``delivery.http_client``): they must classify and deliver alike."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from callbridge.store.keys import Keys
from callbridge.store.records import Completion, CompletionPolicy
from tests.support.deliveries import MakeRig, Rig, event
from tests.support.metrics import sample
from tests.support.servers import free_port
from tests.support.settings import OLD_SECRET, SECRET


@pytest.fixture(params=["lean", "aiohttp"])
def make_rig(make_rig: MakeRig, request: pytest.FixtureRequest) -> MakeRig:
    """The conftest rig, with the HTTP client of this run (unless a test names one)."""

    async def build(subs: dict[str, dict[str, Any]], **delivery: Any) -> Rig:
        return await make_rig(subs, **{"http_client": request.param, **delivery})

    return build


async def test_signed_delivery_verifies_with_reference_library(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {}})
    assert await rig.enqueue("crm", event(1), event(2, "c2")) == 2
    assert await rig.deliverer.drain() == 2
    rec = rig.receivers["crm"]
    payloads = rec.verify_all(SECRET)
    assert sorted(p["data"]["call_id"] for p in payloads) == ["c1", "c2"]
    h = rec.delivered[0].headers
    assert h["Content-Type"] == "application/json"
    assert h["User-Agent"].startswith("callbridge/")
    assert (await rig.queue.record("crm", "evt_c1_1"))["state"] == "delivered"  # type: ignore[index]


async def test_rotation_both_secrets_verify(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {"secret": None, "secrets": [SECRET, OLD_SECRET]}})
    await rig.enqueue("crm", event(1))
    await rig.deliverer.drain()
    assert len(rig.receivers["crm"].verify_all(SECRET)) == 1
    assert len(rig.receivers["crm"].verify_all(OLD_SECRET)) == 1


async def test_enqueue_is_idempotent(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {}})
    assert await rig.enqueue("crm", event(1)) == 1
    assert await rig.enqueue("crm", event(1)) == 0
    await rig.deliverer.drain()
    assert await rig.enqueue("crm", event(1)) == 0  # delivered records remember
    assert len(rig.receivers["crm"].received) == 1


async def test_receiver_down_then_back_gets_everything_with_stable_ids(make_rig: MakeRig) -> None:
    rig = await make_rig(
        {"crm": {"retry_schedule_seconds": [0] * 10}}, breaker_failure_threshold=100
    )
    rec = rig.receivers["crm"]
    rec.answers.extend([500] * 6)
    await rig.enqueue("crm", *[event(i, f"c{i}") for i in range(3)])
    await rig.deliverer.drain()
    ids = {r.id for r in rec.delivered}
    assert ids == {f"evt_c{i}_{i}" for i in range(3)}
    # Every attempt of one event carried the same id and the same body.
    by_id: dict[str, set[bytes]] = {}
    for r in rec.received:
        by_id.setdefault(r.id, set()).add(r.body)
    assert all(len(bodies) == 1 for bodies in by_id.values())
    assert len(rec.received) == 9


async def test_exhausted_delivery_goes_dead_with_history_and_replays(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {}}, breaker_failure_threshold=100)
    rec = rig.receivers["crm"]
    rec.default = 500
    await rig.enqueue("crm", event(1))
    await rig.deliverer.drain()
    assert len(rec.received) == 4  # first attempt + 3 retries
    assert await rig.queue.dead_letters("crm") == ["evt_c1_1"]
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert record["state"] == "dead"
    assert [h["status"] for h in record["history"]] == [500] * 4
    assert record["history"][-1]["outcome"] == "dead"
    assert sample(rig.metrics, "dead_letters_total", subscription="crm") == 1
    rec.default = 200
    assert await rig.queue.requeue("crm", "evt_c1_1", reset_attempts=True)
    await rig.deliverer.drain()
    assert [r.id for r in rec.delivered] == ["evt_c1_1"]
    assert await rig.queue.dead_letters("crm") == []


async def test_410_disables_and_reenable_resumes(make_rig: MakeRig) -> None:
    # One at a time, so nothing else is already in flight when the 410 arrives.
    rig = await make_rig({"crm": {"max_in_flight": 1}})
    rec = rig.receivers["crm"]
    rec.answers.append(410)
    await rig.enqueue("crm", event(1), event(2, "c2"))
    await rig.deliverer.drain()
    ep = await rig.queue.endpoint("crm")
    assert ep.disabled
    assert rec.delivered == []
    depth = await rig.queue.depths("crm")
    assert depth["ready"] == 2  # nothing dropped while disabled
    await rig.queue.set_enabled("crm", True)
    await rig.deliverer.drain()
    assert {r.id for r in rec.delivered} == {"evt_c1_1", "evt_c2_2"}


async def test_breaker_opens_and_spares_other_subscription(make_rig: MakeRig) -> None:
    rig = await make_rig(
        {"dead": {"max_in_flight": 1}, "ok": {}},
        breaker_min_attempts=3,
        breaker_cooloff_seconds=3600,
    )
    rig.receivers["dead"].default = 500
    events = [event(i, f"c{i}") for i in range(20)]
    await rig.enqueue("dead", *events)
    await rig.enqueue("ok", *events)
    await rig.deliverer.drain()
    # Every attempt failed: open once the window held min_attempts, not 20 x 4.
    assert len(rig.receivers["dead"].received) == 3
    assert (await rig.queue.endpoint("dead")).open_until_ms > 0
    assert len(rig.receivers["ok"].delivered) == 20
    depth = await rig.queue.depths("dead")
    assert depth["ready"] + depth["scheduled"] == 20  # all still queued


async def test_flaky_endpoint_never_opens_the_breaker(make_rig: MakeRig) -> None:
    # One first attempt in five fails: an endpoint that mostly works is not down.
    rig = await make_rig({"crm": {"retry_schedule_seconds": [0] * 3, "max_in_flight": 4}})
    rec = rig.receivers["crm"]
    rec.answers.extend([500, 200, 200, 200, 200] * 20)
    await rig.enqueue("crm", *[event(i, f"c{i}") for i in range(100)])
    await rig.deliverer.drain()
    assert len({r.id for r in rec.delivered}) == 100
    ep = await rig.queue.endpoint("crm")
    assert ep.open_until_ms == 0


async def test_connection_refused_opens_the_breaker_at_once(make_rig: MakeRig) -> None:
    # Nothing listens there: two refused connections and the breaker opens, long
    # before the window holds min_attempts (20) attempts.
    rig = await make_rig(
        {"crm": {"max_in_flight": 1, "url": f"http://127.0.0.1:{free_port()}/h"}},
        breaker_failure_threshold=2,
        breaker_cooloff_seconds=3600,
    )
    await rig.enqueue("crm", *[event(i, f"c{i}") for i in range(10)])
    await rig.deliverer.drain()
    ep = await rig.queue.endpoint("crm")
    assert ep.open_until_ms > 0
    depth = await rig.queue.depths("crm")
    assert depth["ready"] + depth["scheduled"] == 10
    records = [await rig.queue.record("crm", f"evt_c{i}_{i}") for i in range(10)]
    assert sum(r["attempts"] for r in records if r) == 2


async def test_429_paces_the_endpoint_and_is_not_a_breaker_failure(make_rig: MakeRig) -> None:
    # A fixed limit: the 429 halves it (adaptive, it would start from one at a time).
    rig = await make_rig(
        {"crm": {"max_in_flight": 8, "adaptive_concurrency": False}}, breaker_min_attempts=1
    )
    rec = rig.receivers["crm"]
    rec.answers.append(429)
    await rig.enqueue("crm", event(1, "c1"))
    assert await rig.deliverer.run_once() == 1
    ep = await rig.queue.endpoint("crm")
    assert ep.open_until_ms == 0  # min_attempts 1: any counted failure would open it
    assert ep.paced_until_ms > 0
    # Paced (Retry-After: 1 s): half the requests at once, four not eight, and the
    # delivery that got the 429 waits for its Retry-After.
    await rig.enqueue("crm", *[event(1, f"c{i}") for i in range(2, 12)])
    assert await rig.deliverer.run_once() == 4
    assert "evt_c1_1" not in [r.id for r in rec.received][1:]
    assert len(rec.received) == 5


async def test_per_call_order_waits_for_first_attempt(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {"max_in_flight": 16}})
    await rig.enqueue("crm", *[event(i, "same") for i in range(1, 6)])
    await rig.deliverer.drain()
    seqs = [r.payload()["data"]["sequence"] for r in rig.receivers["crm"].received]
    assert seqs == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("redirect", "redirect 302 not followed"),
        ("garbage", "invalid HTTP response"),
        ("hang", "timeout after 0.3s"),
    ],
)
async def test_broken_receivers_are_classified_failures(
    make_rig: MakeRig, answer: str, reason: str
) -> None:
    rig = await make_rig({"crm": {"timeout_seconds": 0.3, "retry_schedule_seconds": [3600]}})
    rec = rig.receivers["crm"]
    rec.answers.append(answer)
    await rig.enqueue("crm", event(1))
    assert await rig.deliverer.run_once() == 1
    rec.release.set()
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert record["state"] == "pending"
    error = record["history"][0]["error"]
    assert error
    assert reason in error
    assert (await rig.queue.depths("crm"))["scheduled"] == 1


async def test_huge_response_body_is_not_read(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {}})
    rig.receivers["crm"].answers.append("huge")
    await rig.enqueue("crm", event(1))
    await rig.deliverer.drain()
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert record["state"] == "delivered"
    assert len(record["history"][0]["response"]) <= 1100


async def test_unreachable_host_is_a_connect_failure(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {"retry_schedule_seconds": [3600]}})
    # Point the subscription at a closed port.
    sub = rig.settings.subscriptions[0].model_copy(
        update={"url": f"http://127.0.0.1:{free_port()}/h"}
    )
    result = await rig.deliverer.sender.send(sub, sub.signing_keys, "evt_x", b"{}")
    assert result.status is None
    assert result.error
    assert result.error.startswith("connect")


async def test_expired_claim_is_reclaimed_and_stale_outcome_ignored(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {}})
    await rig.enqueue("crm", event(1))
    # A worker that claimed and died: its claim has a visibility deadline in the past.
    claimed = await rig.queue.claim("crm", max_in_flight=4, limit=4, visibility_ms=-1, token="dead")
    assert [c.event_id for c in claimed] == ["evt_c1_1"]
    assert await rig.queue.sweep("crm", dead_retention_ms=10**9) == 1
    await rig.deliverer.drain()
    assert [r.id for r in rig.receivers["crm"].delivered] == ["evt_c1_1"]
    policy = CompletionPolicy(
        retention_ms=1000, dead_retention_ms=1000, breaker_threshold=1, cooloff_ms=1,
        cooloff_max_ms=1,
    )  # fmt: skip
    late = Completion("evt_c1_1", claimed[0].token, "dead")
    [outcome] = await rig.queue.complete("crm", [late], policy)
    assert outcome == "stale"
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert record["state"] == "delivered"


async def test_cancelled_attempt_hands_claim_back(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {"timeout_seconds": 30}})
    rec = rig.receivers["crm"]
    rec.answers.append("hang")
    await rig.enqueue("crm", event(1))
    task = asyncio.create_task(rig.deliverer.run_once())
    await rec.arrived.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rec.release.set()
    depth = await rig.queue.depths("crm")
    assert depth == {"ready": 1, "scheduled": 0, "inflight": 0, "dead": 0, "waiting": 0}
    record = await rig.queue.record("crm", "evt_c1_1")
    assert record is not None
    assert record["attempts"] == 0


async def test_payload_bytes_are_exactly_the_event_body(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {}})
    ev = event(1)
    await rig.enqueue("crm", ev)
    await rig.deliverer.drain()
    assert rig.receivers["crm"].delivered[0].body == ev.body
    assert orjson.loads(ev.body)["type"] == "call.completed"


async def test_long_run_of_one_call_does_not_starve_others(make_rig: MakeRig) -> None:
    rig = await make_rig({"crm": {"max_in_flight": 8, "adaptive_concurrency": False}})
    # 200 events of one call first in the queue, then one event each of 5 other calls.
    await rig.enqueue("crm", *[event(i, "busy") for i in range(1, 201)])
    await rig.enqueue("crm", *[event(1, f"other{i}") for i in range(5)])
    assert await rig.deliverer.run_once() == 6  # the head of "busy" + all 5 others
    calls = {r.payload()["data"]["call_id"] for r in rig.receivers["crm"].received}
    assert calls == {"busy", *(f"other{i}" for i in range(5))}


async def test_a_busy_subscription_hands_freed_slots_to_a_waiting_one(make_rig: MakeRig) -> None:
    """A loop claims into the slots its finished attempts free, in the same round
    trip; while another subscription waits for a replica slot it hands them back."""
    rig = await make_rig(
        {"busy": {"max_in_flight": 4}, "quiet": {"max_in_flight": 4}}, global_max_in_flight=4
    )
    n = 1000
    await rig.enqueue("busy", *[event(1, f"c{i}") for i in range(n)])
    stopping = asyncio.Event()
    task = asyncio.create_task(rig.deliverer.run(stopping))
    busy, quiet = rig.receivers["busy"], rig.receivers["quiet"]
    try:
        async with asyncio.timeout(20):
            while len(busy.received) < 20:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            await rig.enqueue("quiet", event(1, "q"))
            rig.deliverer.wake("quiet")
            while not quiet.received:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        assert len(busy.received) < n
    finally:
        stopping.set()
        await task


async def test_chain_entries_go_once_their_last_event_is_done(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """The per-call chain (call -> last event queued) is what parks a call's next event;
    its entries are released in bulk at the end of a step (`_outcomes.lua`). One naming
    a later event than the one just delivered stays; once every call's last event is
    delivered or dead, the hash is empty (else it grows with every call ever seen)."""
    rig = await make_rig({"crm": {"max_in_flight": 16, "retry_schedule_seconds": [0]}})
    chain = Keys().chain("crm")
    # Calls a..d, two events each; c's first attempts fail, d's event 2 dies.
    rig.receivers["crm"].answers.extend([200, 200, 500, 200])
    await rig.enqueue("crm", *[event(1, c) for c in "abcd"])
    await rig.enqueue("crm", *[event(2, c) for c in "abcd"])
    # One entry per call, and the batch's count of call events without a first attempt
    # (batch events wait for it: enqueue.lua).
    assert await redis_client.hgetall(chain) == {
        **{f"b1/{c}".encode(): f"evt_{c}_2".encode() for c in "abcd"},
        b"#b1": b"8",
    }
    await rig.deliverer.run_once()  # first events (as many as the limit lets start)
    # Every call's entry names its event 2, queued: none goes.
    tried = len(rig.receivers["crm"].received)
    assert tried >= 1
    assert await redis_client.hgetall(chain) == {
        **{f"b1/{c}".encode(): f"evt_{c}_2".encode() for c in "abcd"},
        b"#b1": str(8 - tried).encode(),
    }
    rig.receivers["crm"].default = 500
    rig.receivers["crm"].answers.extend([200, 200, 200])
    await rig.deliverer.drain()
    assert await redis_client.hlen(chain) == 0
    assert await rig.queue.dead_count("crm") >= 1
