"""Change detection end to end: simulator (faults on) -> poller -> Redis -> relay ->
delivery -> a real receiver, checked against the simulator's ground truth."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from callbridge.app import Bridge
from callbridge.models import TERMINAL_STATUSES
from callbridge.poll.batch_cache import BatchCache
from callbridge.simulator import FaultConfig, Simulator
from callbridge.store.callstate import CallStates
from callbridge.store.keys import Keys
from tests.support.bridges import MakeService, sim_config
from tests.support.metrics import sample
from tests.support.settings import SECRET


async def poll_all(svc: Bridge, sim: Simulator) -> None:
    for batch_id in sim.batch_ids:
        await svc.poller.poll_once(batch_id)


@pytest.mark.parametrize("scan", ["auto", "active"])
async def test_lifecycle_with_faults_matches_ground_truth(
    make_service: MakeService, scan: str
) -> None:
    faults = FaultConfig(
        rate_limit_ratio=0.03,
        retry_after_seconds=0,
        server_error_ratio=0.03,
        malformed_ratio=0.03,
        shift_ratio=0.1,
    )
    svc, sim, receiver = await make_service(
        sim_config(faults=faults),
        upstream={"page_size": 7, "max_attempts": 6},
        poller={"scan": scan},
    )
    for _ in range(400):
        await poll_all(svc, sim)
        if sim.is_finished():
            break
        sim.advance()
    await poll_all(svc, sim)
    await poll_all(svc, sim)
    assert sim.is_finished()
    await svc.deliverer.drain()

    payloads = receiver.verify_all(SECRET)
    ids = [r.id for r in receiver.delivered]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    by_call: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    completions: dict[str, int] = defaultdict(int)
    for p in payloads:
        if p["type"] == "batch.completed":
            completions[p["data"]["batch_id"]] += 1
        else:
            by_call[(p["data"]["batch_id"], p["data"]["call_id"])].append(p["data"])

    checked_long = 0
    for batch_id in sim.batch_ids:
        assert completions[batch_id] >= 1
        for call in sim.calls(batch_id):
            history = sim.history(batch_id, call["call_id"])
            events = sorted(by_call[(batch_id, call["call_id"])], key=lambda d: d["sequence"])
            statuses = [d["status"] for d in events if d["status"] != d["previous_status"]]
            # No event for a status the call never had, in the order it had them.
            truth = [s for _, s in history]
            it = iter(truth)
            assert all(s in it for s in statuses), (truth, statuses)
            # Every status that lasted two polls or more was reported exactly once.
            for i, (step, status) in enumerate(history[1:], start=1):
                end = history[i + 1][0] if i + 1 < len(history) else None
                if end is None or end - step >= 2:
                    checked_long += 1
                    n_truth = sum(1 for _, s in history[1:] if s == status)
                    assert 1 <= statuses.count(status) <= n_truth, (truth, statuses, status)
            # The final status is terminal and was reported.
            assert history[-1][1] in TERMINAL_STATUSES
            assert statuses
            assert statuses[-1] == history[-1][1]
            seqs = [d["sequence"] for d in events]
            assert seqs == list(range(1, len(seqs) + 1))
    assert checked_long > 50
    assert (sample(svc.metrics, "upstream_requests_total", outcome="ok", code="200") or 0) > 0
    if scan == "active":
        # Faults make some cycles fall back to full scans; most still read actively.
        active = sample(svc.metrics, "scan_plans_total", plan="active", reason="configured")
        full = sum(
            sample(svc.metrics, "scan_plans_total", plan="full", reason=r) or 0
            for r in ("cold", "unexplained", "completion", "anomaly")
        )
        assert (active or 0) > 2 * full


async def test_replaying_the_same_scan_emits_nothing(make_service: MakeService) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1))
    batch = sim.batch_ids[0]
    sim.advance(3)
    assert await svc.poller.poll_once(batch) == "committed"
    assert await svc.poller.poll_once(batch) == "unchanged"
    # A cold replica (cache dropped, snapshot from Redis) agrees.
    rt = svc.poller.runtime(batch)
    assert rt is not None
    rt.drop_cache()
    assert await svc.poller.poll_once(batch) == "unchanged"


async def test_failed_page_aborts_cycle_and_writes_nothing(make_service: MakeService) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1), upstream={"page_size": 5})
    batch = sim.batch_ids[0]
    await svc.poller.poll_once(batch)
    sim.advance(4)
    meta_before = await svc.store.load_meta(batch)
    sim.faults = FaultConfig(server_error_ratio=1.0)
    assert await svc.poller.poll_once(batch) == "failed"
    assert (await svc.store.load_meta(batch)).version == meta_before.version
    sim.faults = FaultConfig()
    assert await svc.poller.poll_once(batch) == "committed"


async def test_lost_lease_is_fenced(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1))
    batch = sim.batch_ids[0]
    await svc.poller.poll_once(batch)
    # Another replica takes the batch while this one is paused.
    await redis_client.set(Keys().lease(batch), "other:token", px=60_000)
    sim.advance(5)
    assert await svc.poller.poll_once(batch) == "not_owner"
    rt = svc.poller.runtime(batch)
    assert rt is not None
    assert rt.token is None
    # Even with a stale token in hand, the commit itself refuses to write.
    rt.token = "test:stale"
    rt.states = CallStates()
    from callbridge.errors import LeaseLostError

    with pytest.raises(LeaseLostError):
        await svc.store.commit(
            batch, token="test:stale", expected_version=rt.meta.version, lease_ttl_ms=1000,
            states={}, events=[], timeline=[], timeline_max=5, meta=rt.meta,
        )  # fmt: skip


async def test_404_and_401_are_reported_without_retry_storm(make_service: MakeService) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1))
    await svc.registry.add("sched_missing")
    assert await svc.poller.poll_once("sched_missing") == "not_found"
    assert len([r for r in sim.request_log if "sched_missing" in r[1]]) == 1
    meta = await svc.store.load_meta("sched_missing")
    assert meta.not_found_since_ms > 0
    sim.faults = FaultConfig(auth_fail=True)
    before = len(sim.request_log)
    assert await svc.poller.poll_once(sim.batch_ids[0]) == "auth_failed"
    assert len(sim.request_log) == before + 1
    assert not svc.poller.reach.auth_ok
    assert sample(svc.metrics, "upstream_auth_ok") == 0
    sim.faults = FaultConfig()
    assert await svc.poller.poll_once(sim.batch_ids[0]) in ("committed", "unchanged")
    assert svc.poller.reach.auth_ok


async def test_timeline_records_observations(make_service: MakeService) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=5))
    batch = sim.batch_ids[0]
    for _ in range(30):
        await svc.poller.poll_once(batch)
        sim.advance()
    call_id = sim.calls(batch)[0]["call_id"]
    data = await svc.operations.timeline(batch, call_id)
    assert data is not None
    assert data["timeline"][0]["status"] == "pending"
    assert data["timeline"][0]["event_id"] is None
    assert all(e["event_id"].startswith("evt_") for e in data["timeline"][1:])


def truth_completions(sim: Simulator, batch_id: str) -> int:
    """How often the batch became all-terminal, at step granularity."""
    status = {c["call_id"]: "pending" for c in sim.calls(batch_id)}
    by_step: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for t in sim.transitions():
        if t.batch_id == batch_id:
            by_step[t.step].append((t.call_id, t.status))
    done, completions = False, 0
    for step in sorted(by_step):
        for call_id, s in by_step[step]:
            status[call_id] = s
        now_done = all(s in TERMINAL_STATUSES for s in status.values())
        completions += now_done and not done
        done = now_done
    return completions


async def test_batch_completed_once_per_completion(make_service: MakeService) -> None:
    # Redials after no_answer/busy can reopen a completed batch.
    svc, sim, receiver = await make_service(
        sim_config(seed=6, batches=3, calls_per_batch=2, redial_probability=0.9, concurrency=6)
    )
    for _ in range(300):
        await poll_all(svc, sim)
        if sim.is_finished():
            break
        sim.advance()
    await poll_all(svc, sim)
    await svc.deliverer.drain()
    delivered: dict[str, int] = defaultdict(int)
    for p in receiver.verify_all(SECRET):
        if p["type"] == "batch.completed":
            delivered[p["data"]["batch_id"]] += 1
    truth = {b: truth_completions(sim, b) for b in sim.batch_ids}
    assert max(truth.values()) >= 2  # a redial did reopen a completed batch
    assert dict(delivered) == truth


async def run_until_retired(svc: Bridge, sim: Simulator) -> BatchCache:
    """Play the batch to its end, age it past quiet + linger, run its next cycle."""
    batch = sim.batch_ids[0]
    while not sim.is_finished():
        await svc.poller.poll_once(batch)
        sim.advance()
    await svc.poller.poll_once(batch)
    rt = svc.poller.runtime(batch)
    assert rt is not None
    assert rt.meta.completed
    assert rt.token is not None
    # Quiet for longer than quiet period + linger: the next scheduled cycle retires it.
    rt.meta.last_change_ms = 0
    await svc.scheduler.run_cycle(rt, asyncio.Semaphore(1))
    return rt


async def test_retired_batch_frees_lease_cache_and_series(make_service: MakeService) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=4))
    batch = sim.batch_ids[0]
    rt = await run_until_retired(svc, sim)
    assert rt.retired
    assert rt.token is None
    assert rt.states is None
    assert await svc.leases.owner(batch) is None
    text = generate_latest(svc.metrics.registry).decode()
    assert f'batch="{batch}"' not in text


async def test_retired_batch_is_a_tombstone_that_expires(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    svc, sim, _ = await make_service(
        sim_config(batches=1, calls_per_batch=3), poller={"retired_retention_seconds": 60}
    )
    batch = sim.batch_ids[0]
    await run_until_retired(svc, sim)
    reg = await svc.registry.get(batch)
    assert reg is not None
    assert reg.retired
    # Registering the config again (a restart) does not bring it back...
    await svc.registry.register_config(svc.settings.batches)
    reg = await svc.registry.get(batch)
    assert reg is not None
    assert reg.retired
    assert 0 < await redis_client.pttl(Keys().snapshot(batch)) <= 60_000
    # The drained outbox too: an empty stream per retired batch stayed for ever.
    assert 0 < await redis_client.pttl(Keys().outbox(batch)) <= 60_000
    listed = {b["id"]: b["lifecycle"] for b in await svc.operations.list_batches()}
    assert listed[batch] == "retired"
    # ...an operator can.
    assert await svc.operations.add_batch(batch)
    reg = await svc.registry.get(batch)
    assert reg is not None
    assert not reg.retired


async def test_timelines_are_appended_and_trimmed_exactly(redis_client: aioredis.Redis) -> None:
    """commit.lua appends a call's entry as text and decodes the list only when it is
    full: the stored list stays the last `timeline_max` entries, whatever the statuses
    hold (a status with the entries' own separator in it), starting from a list the
    earlier script wrote and from a value that is not a list at all."""
    from callbridge.models import TimelineEntry
    from callbridge.store.snapshots import BatchMeta, SnapshotStore

    keys = Keys()
    store = SnapshotStore(redis_client, keys)
    batch = "tl_batch"
    await redis_client.set(keys.lease(batch), "tok")
    # Written by the earlier commit script (cjson), and one broken value.
    await redis_client.hset(keys.timeline(batch), "old", '[[1,"queued",1,"call.queued"]]')
    await redis_client.hset(keys.timeline(batch), "broken", "not a list")
    statuses = ["ringing", "answered", "in_progress", "on_hold", 'odd"],["x', "],[", "completed"]
    version = 0
    for n, status in enumerate(statuses, start=2):
        entries = [TimelineEntry(c, n, status, n, None) for c in ("old", "broken", "new")]
        version, _ = await store.commit(
            batch, token="tok", expected_version=version, lease_ttl_ms=10_000, states={},
            events=[], timeline=entries, timeline_max=3, meta=BatchMeta(version=version),
        )  # fmt: skip
        for call in ("old", "broken", "new"):
            got = await store.timeline(batch, call)
            seen = (["queued"] if call == "old" else []) + statuses[: n - 1]
            assert [e["status"] for e in got] == seen[-3:], (call, n)
            assert got[-1] == {
                "at_ms": n, "status": status, "sequence": n, "event_type": None, "event_id": None
            }  # fmt: skip
