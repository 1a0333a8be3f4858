"""Defects found by reading the queue, store and poller (issue 12), each pinned by a
test that failed before its fix: real Redis, real simulator, real receiver."""

from __future__ import annotations

import asyncio
import hashlib
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from callbridge.app import Bridge
from callbridge.config import RedisSettings
from callbridge.deliver.relay import Relay
from callbridge.janitor import Janitor
from callbridge.poll.candidates import ItemSignatures, select_candidates
from callbridge.poll.scheduler import Scheduler
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.connection import connect
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue
from callbridge.store.records import Completion, CompletionPolicy
from callbridge.store.scripts import source
from tests.support.bridges import MakeService, sim_config
from tests.support.deliveries import MakeRig, event
from tests.support.metrics import sample
from tests.support.proxy import ReplyDropper
from tests.support.receivers import Receiver
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET, make_settings


async def test_failed_takeover_drain_is_retried_and_nothing_is_stranded(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """A take-over drain that fails (a Redis error) is retried by the next cycle; the
    earlier owner's committed events reach the subscription, older ones first."""
    first, sim, receiver = await make_service(sim_config(batches=1, calls_per_batch=5))
    batch = sim.batch_ids[0]
    await first.poller.poll_once(batch)
    sim.advance(3)
    due = Keys().due("crm")
    # The subscription's queue is broken: the fan-out after the commit fails.
    await redis_client.set(due, "not a sorted set")
    # Committed; its fan-out failed (logged), the events wait in the outbox.
    assert await first.poller.poll_once(batch) == "committed"
    assert await redis_client.xlen(Keys().outbox(batch)) > 0
    await first.poller.release_all()

    second = await Bridge.create(first.settings, replica_id="second")
    try:
        # The new owner's take-over drain fails too...
        with pytest.raises(ResponseError):
            await second.poller.poll_once(batch)
        await redis_client.delete(due)
        # ...and is retried by its next cycle, before the cycle's own events.
        sim.advance(2)
        await second.poller.poll_once(batch)
        assert await redis_client.xlen(Keys().outbox(batch)) == 0
        await second.deliverer.drain()
    finally:
        await second.close()
    seqs: dict[str, list[int]] = {}
    for p in receiver.verify_all(SECRET):
        if p["type"].startswith("call."):
            seqs.setdefault(p["data"]["call_id"], []).append(p["data"]["sequence"])
    assert seqs
    for call_seqs in seqs.values():
        assert call_seqs == list(range(1, len(call_seqs) + 1))


async def test_a_removed_batch_fans_out_what_it_committed_then_expires(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """DELETE /v1/batches/{id} after a fan-out failed: the events it had committed
    stayed in the outbox, nothing drained it, and its keys never expired."""
    svc, sim, receiver = await make_service(sim_config(batches=1, calls_per_batch=5))
    batch = sim.batch_ids[0]
    await svc.poller.poll_once(batch)
    sim.advance(3)
    k = Keys()
    await redis_client.set(k.due("crm"), "not a sorted set")
    assert await svc.poller.poll_once(batch) == "committed"  # its fan-out failed
    await redis_client.delete(k.due("crm"))
    committed = await redis_client.xlen(k.outbox(batch))
    assert committed > 0
    assert await svc.operations.remove_batch(batch)
    keys = (k.snapshot(batch), k.batch_meta(batch), k.timeline(batch), k.outbox(batch))
    retention_ms = int(svc.settings.poller.retired_retention_seconds * 1000)
    for key in keys:
        assert 0 < await redis_client.pttl(key) <= retention_ms, key
    # The replica that had it forgets it at its next sync, fanning out first.
    await svc.scheduler.sync()
    assert svc.poller.runtime(batch) is None
    assert await redis_client.xlen(k.outbox(batch)) == 0
    assert await svc.deliverer.drain() == committed
    assert len({r.id for r in receiver.delivered}) == committed


async def test_watching_a_retired_batch_again_clears_its_expiry(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=3))
    batch = sim.batch_ids[0]
    await svc.poller.poll_once(batch)
    sim.advance()
    await svc.poller.poll_once(batch)  # events: the outbox stream exists, drained
    k = Keys()
    keys = (k.snapshot(batch), k.batch_meta(batch), k.timeline(batch), k.outbox(batch))
    # Retired: its state expires after the retention...
    await svc.store.expire_batch(batch, 60_000)
    for key in keys:
        assert 0 < await redis_client.pttl(key) <= 60_000, key
    # ...watched again: the next commit makes it permanent, or it would vanish
    # under an active batch and every call would be re-emitted (and events the
    # outbox held when it expired would be lost).
    await svc.operations.add_batch(batch)
    sim.advance()
    await svc.poller.poll_once(batch)
    for key in keys:
        assert await redis_client.pttl(key) == -1, key


def _forge_crc(prefix: bytes, suffix: bytes, target: int, n: int = 10) -> bytes:
    """`n` characters (from '@'..'O') making crc32(prefix + them + suffix) == target.

    CRC-32 is affine in the message bits: flipping the low four bits of each
    character gives 4n changes of the checksum; solve for `target` over GF(2).
    """
    base = bytearray(b"@" * n)
    c0 = zlib.crc32(prefix + base + suffix)
    basis: dict[int, tuple[int, int]] = {}  # leading bit -> (checksum change, flips)
    for k in range(4 * n):
        m = bytearray(base)
        m[k // 4] ^= 1 << (k % 4)
        vec, mask = zlib.crc32(prefix + m + suffix) ^ c0, 1 << k
        for bit in range(31, -1, -1):
            if not vec >> bit & 1:
                continue
            if bit not in basis:
                basis[bit] = (vec, mask)
                break
            vec, mask = vec ^ basis[bit][0], mask ^ basis[bit][1]
    want, flips = target ^ c0, 0
    for bit in range(31, -1, -1):
        if want >> bit & 1:
            vec, mask = basis[bit]
            want, flips = want ^ vec, flips ^ mask
    for k in range(4 * n):
        if flips >> k & 1:
            base[k // 4] ^= 1 << (k % 4)
    return bytes(base)


def test_a_checksum_collision_does_not_hide_a_change() -> None:
    """32-bit item signatures let a CRC collision skip a real change (possibly a final
    status); signatures are 64 bits now."""
    before = {"call_id": "c1", "status": "in_progress", "x": "@@@@@@@@@@"}
    known = ItemSignatures()
    known.update(select_candidates([[orjson.dumps(before)]], known).signatures)
    raw_before = orjson.dumps(before)
    head = b'{"call_id":"c1","status":"completed","x":"'
    forged = _forge_crc(head, b'"}', zlib.crc32(raw_before))
    after = {"call_id": "c1", "status": "completed", "x": forged.decode()}
    assert zlib.crc32(orjson.dumps(after)) == zlib.crc32(raw_before)
    assert select_candidates([[orjson.dumps(after)]], known).items == [after]


async def test_heartbeats_use_the_server_clock(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    svc, _, _ = await make_service(sim_config(batches=1, calls_per_batch=1))
    assert await svc.leases.heartbeat("r1", 5000) == 1
    score = await redis_client.zscore(Keys().replicas(), "r1")
    server_s, server_us = await redis_client.time()
    assert abs(score - (server_s * 1000 + server_us / 1000)) < 1000
    await svc.leases.leave("r1")
    assert await svc.leases.live_replicas(5000) == 0


async def test_a_dead_replica_with_a_fast_clock_stops_counting_as_alive(
    make_service: MakeService,
) -> None:
    """A replica whose clock ran an hour fast heartbeated an hour into the future:
    once dead it still counted as alive, the others sized their shares for one
    replica too many and some batches went unpolled."""
    svc, _, _ = await make_service(
        sim_config(batches=1, calls_per_batch=1), poller={"lease_ttl_seconds": 2}
    )
    fast = Scheduler(
        svc.settings, svc.poller, svc.store, svc.leases, svc.registry, svc.relay, svc.metrics,
        wall_ms=lambda: int(time.time() * 1000) + 3_600_000,
    )  # fmt: skip
    await fast.sync()  # one heartbeat; then the replica dies
    assert await svc.leases.live_replicas(2000) == 1
    await asyncio.sleep(2.2)
    assert await svc.leases.live_replicas(2000) == 0


@pytest.mark.parametrize("cut_off", ["key rejected", "platform unreachable"])
async def test_replica_that_cannot_poll_hands_its_batches_over(
    cut_off: str, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    """A replica whose API key is rejected, or that cannot reach the platform, kept
    renewing leases it could not use: its batches went unpolled."""
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=2, batches=4, calls_per_batch=3))
    upstream = await aiohttp_server(make_app(sim))

    def settings(base_url: str, api_key: str) -> Any:
        return make_settings(
            base_url,
            redis_url,
            batches=sim.batch_ids,
            upstream={"api_key": api_key},
            poller={"interval_seconds": 0.2, "lease_ttl_seconds": 2, "jitter_ratio": 0},
        )

    good_url = str(upstream.make_url(""))
    bad_settings = (
        settings(good_url, "sk_rejected")
        if cut_off == "key rejected"
        else settings(f"http://127.0.0.1:{free_port()}", API_KEY)  # nothing listens
    )
    bad = await Bridge.create(bad_settings, replica_id="bad")
    good = await Bridge.create(settings(good_url, API_KEY), replica_id="good")
    stop = asyncio.Event()
    await bad.registry.register_config(bad.settings.batches)
    tasks = [asyncio.create_task(b.scheduler.run(stop)) for b in (bad, good)]
    try:
        deadline = time.monotonic() + 20
        while not (len(good.poller.owned()) == 4 and not bad.poller.owned()):
            assert time.monotonic() < deadline, (bad.poller.owned(), good.poller.owned())
            await asyncio.sleep(0.1)
        assert not bad.poller.reach.can_poll
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for b in (bad, good):
            await b.close()


async def test_a_claim_holds_its_request_slot(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """Claims take this replica's request slot first: a claimed delivery never waits
    for a slot while its visibility deadline runs (it was swept and sent twice)."""
    rig = await make_rig({"a": {}, "b": {}}, global_max_in_flight=1)
    for name in ("a", "b"):
        rig.receivers[name].answers.append("hang")
        await rig.enqueue(name, event(1, "c1"), event(2, "c2"))
    task = asyncio.create_task(rig.deliverer.run_once("a"))
    await rig.receivers["a"].arrived.wait()
    # The replica's one slot is held by a's claim: b claims nothing (before the fix
    # it claimed, then waited for the slot while its visibility deadline ran).
    assert await asyncio.wait_for(rig.deliverer.run_once("b"), 10) == 0
    k = Keys()
    inflight = [await redis_client.zcard(k.inflight(n)) for n in ("a", "b")]
    assert inflight == [1, 0]
    rig.receivers["a"].release.set()
    assert await task == 1


async def test_loops_claiming_at_once_hold_no_more_claims_than_slots(
    make_rig: MakeRig, redis_client: aioredis.Redis, lossy_redis: Any
) -> None:
    """Four subscriptions' loops claim at once, their claims' replies slow (a busy
    Redis). Each loop once counted as free the slots of claims whose requests had
    not started: the replica held 8 claims for 2 slots, and the extra ones waited
    for a slot while their visibility deadline ran (swept, then sent twice)."""
    proxy, url = lossy_redis
    names = ("a", "b", "c", "d")
    rig = await make_rig({n: {} for n in names}, via=url, global_max_in_flight=2)
    for name in names:
        rig.receivers[name].answers.extend(["hang"] * 3)
        await rig.enqueue(name, *(event(1, f"c{i}") for i in range(3)))
    proxy.slow(_sha("claim"), 0.1)
    stop = asyncio.Event()
    loops = asyncio.create_task(rig.deliverer.run(stop))
    k = Keys()
    held: list[int] = []
    for _ in range(15):
        await asyncio.sleep(0.05)
        held.append(sum([await redis_client.zcard(k.inflight(n)) for n in names]))
    for r in rig.receivers.values():
        r.release.set()
    try:
        async with asyncio.timeout(10):
            while any(len(r.received) < 3 for r in rig.receivers.values()):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await loops
    assert max(held) == 2, held  # two slots: two claims at most, both sent at once
    for r in rig.receivers.values():
        ids = [d.id for d in r.received]
        assert len(ids) == len(set(ids)) == 3  # each sent once


async def test_blocked_successors_never_hide_a_chain_head(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """100 calls with 26 events each; their heads claimed, then handed back by the
    sweep (their worker died) behind their own successors. The claim scan once
    looked at ~2,000 due entries, all blocked successors: nothing was ever claimed."""
    rig = await make_rig({"crm": {"max_in_flight": 100}})
    for c in range(100):
        await rig.enqueue("crm", *[event(n, f"c{c}") for n in range(26)])
    heads = await rig.queue.claim(
        "crm", max_in_flight=100, limit=100, visibility_ms=0, token="dead-worker"
    )
    assert len(heads) == 100
    assert await rig.queue.sweep("crm", dead_retention_ms=60_000) == 100
    depth = await rig.queue.depths("crm")
    assert (depth["ready"], depth["waiting"]) == (100, 2500)
    claimed = await rig.queue.claim(
        "crm", max_in_flight=100, limit=10, visibility_ms=60_000, token="live-worker"
    )
    assert len(claimed) == 10
    assert {c.event_id for c in claimed} <= {f"evt_c{c}_0" for c in range(100)}


def _sha(script: str) -> bytes:
    return hashlib.sha1(source(script).encode()).hexdigest().encode()  # noqa: S324


@pytest.fixture
async def lossy_redis(redis_url: str, redis_client: aioredis.Redis) -> AsyncIterator[Any]:
    """(proxy, URL through it): a Redis whose replies can be lost, one at a time."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = ReplyDropper(port)
    url = f"redis://127.0.0.1:{await proxy.start()}/0"
    yield proxy, url
    await proxy.close()


async def test_a_claim_resent_after_a_lost_reply_claims_nothing_more(lossy_redis: Any) -> None:
    proxy, url = lossy_redis
    client = connect(url, RedisSettings(url=url))
    try:
        queue = DeliveryQueue(client, Keys())
        await queue.enqueue("crm", [(event(1, f"c{i}"), 0) for i in range(10)])
        assert len(
            await queue.claim("crm", max_in_flight=50, limit=1, visibility_ms=60_000, token="w")
        )
        proxy.arm(_sha("claim"))
        claimed = await queue.claim(
            "crm", max_in_flight=50, limit=3, visibility_ms=60_000, token="w"
        )
        assert proxy.dropped == 1
        assert len(claimed) == 3
        # Re-sent by the client: the same three, not three more held as phantoms.
        assert (await queue.depths("crm"))["inflight"] == 4
    finally:
        await client.aclose()


async def test_a_step_resent_after_a_lost_reply_records_and_claims_once(
    lossy_redis: Any,
) -> None:
    """One call records outcomes and claims (issue 13): re-sent after a lost reply it
    returns what applied the first time and the same claims, changing nothing more."""
    proxy, url = lossy_redis
    client = connect(url, RedisSettings(url=url))
    policy = CompletionPolicy(
        retention_ms=60_000, dead_retention_ms=60_000, breaker_threshold=5, cooloff_ms=1000,
        cooloff_max_ms=1000,
    )  # fmt: skip
    try:
        queue = DeliveryQueue(client, Keys())
        await queue.enqueue("crm", [(event(1, f"c{i}"), 0) for i in range(6)])
        first = await queue.claim("crm", max_in_flight=2, limit=2, visibility_ms=60_000, token="w")
        assert len(first) == 2
        outcomes = [Completion(c.event_id, c.token, "success", kind="ok") for c in first]
        proxy.arm(_sha("claim"))
        applied, claimed = await queue.step(
            "crm", outcomes, policy, max_in_flight=2, limit=2, visibility_ms=60_000, token="w"
        )
        assert proxy.dropped == 1
        assert applied == ["success", "success"]
        assert len(claimed) == 2
        assert not {c.event_id for c in claimed} & {c.event_id for c in first}
        depth = await queue.depths("crm")
        assert (depth["inflight"], depth["ready"]) == (2, 2)
        for c in first:
            record = await queue.record("crm", c.event_id)
            assert record is not None
            assert (record["state"], record["attempts"], len(record["history"])) == (
                "delivered",
                1,
                1,
            )
    finally:
        await client.aclose()


async def test_a_commit_resent_after_a_lost_reply_is_not_a_conflict(
    lossy_redis: Any, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    proxy, url = lossy_redis
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=4, batches=1, calls_per_batch=6))
    upstream = await aiohttp_server(make_app(sim))
    receiver = Receiver()
    hook = await aiohttp_server(receiver.app())
    settings = make_settings(
        str(upstream.make_url("")),
        url,
        batches=sim.batch_ids,
        subscriptions=[{"name": "crm", "url": str(hook.make_url("/hook")), "secret": SECRET}],
    )
    bridge = await Bridge.create(settings, replica_id="lossy")
    try:
        batch = sim.batch_ids[0]
        await bridge.poller.poll_once(batch)  # first sight: all pending, recorded silently
        sim.advance(3)
        proxy.arm(_sha("commit"))
        # The first run wrote; the re-sent one must not fail on the version it moved
        # (it was a CONFLICT: the batch idled for a lease TTL).
        assert await bridge.poller.poll_once(batch) == "committed"
        assert proxy.dropped == 1
        await bridge.deliverer.drain()
        ids = [r.id for r in receiver.delivered]
        assert ids
        assert len(ids) == len(set(ids))
        assert await redis_client.xlen(Keys().outbox(batch)) == 0
    finally:
        await bridge.close()


# -- growth without bound ---------------------------------------------------------


async def test_a_full_backlog_dead_letters_new_deliveries(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """An endpoint down or disabled for days once made its queue, then Redis, grow
    without bound (under noeviction even commits then fail)."""
    rig = await make_rig({"crm": {}})
    await rig.queue.set_enabled("crm", False)
    added, overflow = await rig.queue.enqueue(
        "crm", [(event(1, f"c{i}"), 0) for i in range(8)], max_backlog=5
    )
    assert (added, overflow) == (8, 3)
    depth = await rig.queue.depths("crm")
    assert (depth["ready"], depth["dead"]) == (5, 3)
    dead = await rig.queue.dead_letters("crm")
    record = await rig.queue.record("crm", dead[0])
    assert record is not None
    assert record["history"][0]["error"] == "backlog full"
    # Visible and replayable: nothing silently dropped.
    await rig.queue.set_enabled("crm", True)
    for event_id in dead:
        assert await rig.queue.requeue("crm", event_id, reset_attempts=True)
    await rig.deliverer.drain()
    assert len({r.id for r in rig.receivers["crm"].delivered}) == 8


async def test_a_subscription_disabled_in_config_collects_nothing(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=4))
    off = svc.settings.subscriptions[0].model_copy(update={"enabled": False})
    relay = Relay(svc.store, svc.queue, [off])
    batch = sim.batch_ids[0]
    sim.advance(3)
    svc.poller._sink = relay
    await svc.poller.poll_once(batch)
    depth = await svc.queue.depths("crm")
    assert sum(depth.values()) == 0


async def test_removed_subscriptions_are_deleted_after_their_retention(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    rig = await make_rig({"crm": {}, "old": {}})
    await rig.enqueue("old", event(1), event(2, "c2"))
    k = Keys()
    clock = [1_000_000]
    before = Janitor(rig.settings, redis_client, k, rig.metrics, wall_ms=lambda: clock[0])
    assert await before.run_once() == []
    # The config loses "old": kept for the retention (a rolling change, dead letters
    # still inspectable), then every key of it goes; "crm" is untouched.
    only_crm = rig.settings.model_copy(
        update={"subscriptions": [s for s in rig.settings.subscriptions if s.name == "crm"]}
    )
    after = Janitor(only_crm, redis_client, k, rig.metrics, wall_ms=lambda: clock[0])
    assert await after.run_once() == []
    assert sample(rig.metrics, "orphaned_subscriptions") == 1
    clock[0] += int(only_crm.delivery.orphan_retention_seconds * 1000) + 1
    assert await after.run_once() == ["old"]
    assert [key async for key in redis_client.scan_iter(match=k.subscription_pattern("old"))] == []
    assert await redis_client.hkeys(k.subscriptions()) == [b"crm"]
    assert sample(rig.metrics, "orphaned_subscriptions") == 0


async def test_tombstones_of_batches_added_through_the_api_are_pruned(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """Retired batches stayed registered for ever: `registry.all()` and the batch list
    slowed down with history. Those added through the API go after the retention;
    config batches keep theirs (a restart must not watch them afresh)."""
    svc, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=1))
    from_config = sim.batch_ids[0]
    assert await svc.registry.add("sched_from_api")
    for batch_id in (from_config, "sched_from_api"):
        await svc.registry.retire(batch_id)
    # A config batch watched again through the API is still a config batch.
    assert await svc.operations.add_batch(from_config)
    await svc.registry.retire(from_config)
    assert await svc.registry.prune(60_000) == 0  # within the retention
    await asyncio.sleep(0.01)
    assert await svc.registry.prune(1) == 1
    assert set(await svc.registry.all()) == {from_config}


async def test_a_batch_retired_while_the_scheduler_syncs_does_not_stop_polling(
    lossy_redis: Any, aiohttp_server: Any
) -> None:
    """Found by the growth run: a cycle retired a batch (its task popped the runtime)
    while the scheduler's sync awaited a lease renewal; the sync then looked the
    batch up and raised KeyError, and the poller loop stopped for good."""
    proxy, url = lossy_redis
    sim = Simulator(SimulatorConfig(api_key=API_KEY, seed=6, batches=2, calls_per_batch=2))
    upstream = await aiohttp_server(make_app(sim))
    settings = make_settings(str(upstream.make_url("")), url, batches=sim.batch_ids)
    bridge = await Bridge.create(settings, replica_id="sync")
    try:
        await bridge.registry.register_config(settings.batches)
        for batch_id in sim.batch_ids:
            await bridge.poller.poll_once(batch_id)  # both leases held
        later = bridge.poller.runtime(sim.batch_ids[1])
        assert later is not None
        proxy.slow(_sha("renew_lease"), 0.3)  # the first batch's renewal
        sync = asyncio.create_task(bridge.scheduler.sync())
        await proxy.holding.wait()  # the sync awaits the renewal's reply
        later.retired = True
        await bridge.scheduler._retire(later)
        await sync
        assert bridge.poller.runtime(sim.batch_ids[1]) is None
        assert bridge.poller.runtime(sim.batch_ids[0]) is not None
    finally:
        await bridge.close()


async def test_a_released_batch_stops_exporting_its_series(make_service: MakeService) -> None:
    svc, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=3))
    batch = sim.batch_ids[0]
    await svc.poller.poll_once(batch)
    assert sample(svc.metrics, "calls", batch=batch, status="pending") == 3
    rt = svc.poller.runtime(batch)
    assert rt is not None
    # Another replica owns it now (rebalance): its series are that replica's to export.
    await svc.poller.release(rt)
    assert sample(svc.metrics, "calls", batch=batch, status="pending") is None


async def test_a_restarted_replica_takes_its_own_leases_over_at_once(
    make_service: MakeService,
) -> None:
    """A SIGKILLed replica's leases outlived it: its restart (a new process) polled
    nothing for lease_ttl_seconds. Under the same replica id it takes them at once;
    another replica still waits."""
    first, sim, _ = await make_service(sim_config(batches=1, calls_per_batch=3))
    batch = sim.batch_ids[0]
    assert await first.poller.poll_once(batch) == "committed"  # leases "test:<...>"
    killed_token = await first.leases.owner(batch)
    # Killed: nothing released. Another replica must wait for the TTL...
    other = await Bridge.create(first.settings, replica_id="someone-else")
    restarted = await Bridge.create(first.settings, replica_id="test")
    try:
        assert await other.poller.poll_once(batch) == "not_owner"
        # ...the same replica, restarted, need not.
        sim.advance()
        assert await restarted.poller.poll_once(batch) in ("committed", "unchanged")
        owner = await restarted.leases.owner(batch)
        assert owner is not None
        assert owner.startswith("test:")
        assert owner != killed_token
    finally:
        await other.close()
        await restarted.close()


async def test_a_restarted_replica_gives_its_predecessors_claims_back_at_once(
    make_rig: MakeRig,
) -> None:
    rig = await make_rig({"crm": {}})
    await rig.enqueue("crm", event(1, "c1"), event(1, "c2"))
    # The previous process of replica r1 claimed both and was killed.
    dead = await rig.queue.claim(
        "crm", max_in_flight=9, limit=9, visibility_ms=60_000, token="r1:old"
    )
    other = await rig.queue.claim(
        "crm", max_in_flight=9, limit=9, visibility_ms=60_000, token="r2:x"
    )
    assert (len(dead), len(other)) == (2, 0)
    # Restarted, r1 gives back what its predecessor held; nobody else's claims.
    assert await rig.queue.reclaim_own("crm", "r1", "r1:new") == 2
    assert await rig.queue.reclaim_own("crm", "r1", "r1:new") == 0
    assert (await rig.queue.depths("crm"))["ready"] == 2


async def test_a_parked_delivery_released_by_an_older_replica_is_freed_by_the_sweep(
    make_rig: MakeRig, redis_client: aioredis.Redis
) -> None:
    """During a rolling upgrade, a replica of the previous release completes a call's
    first event without knowing its successor is parked: the sweep frees it."""
    rig = await make_rig({"crm": {}})
    await rig.enqueue("crm", event(1, "c1"), event(2, "c1"))
    assert (await rig.queue.depths("crm"))["waiting"] == 1
    # The previous release's outcome script: attempts counted, nothing released.
    record = Keys().delivery("crm", "evt_c1_1")
    await redis_client.hset(record, mapping={"state": "delivered", "attempts": 1})
    await redis_client.zrem(Keys().due("crm"), "evt_c1_1")
    assert await rig.queue.sweep("crm", dead_retention_ms=60_000) == 0
    depth = await rig.queue.depths("crm")
    assert (depth["waiting"], depth["ready"]) == (0, 1)
