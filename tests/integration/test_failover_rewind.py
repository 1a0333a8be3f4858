"""A failover that rewinds Redis (issue 21, part 2): with asynchronous replication the
promoted replica may lack the primary's last writes. Each test lets a commit's events
reach a real receiver, puts back a copy of the keyspace taken before that commit (what
the promoted replica holds), lets the world move on and the bridge carry on, then
checks what the receiver got: no id with two bodies, no (call, sequence) under two ids,
no real change lost to a receiver that deduplicates on `webhook-id`, every
`batch.completed` right.

With `redis.min_replicas_to_ack: 0` (the default) the ids alone must keep the first
three promises they can keep (a, c, d); with 1, a real replica that stops acknowledging
before the commit makes the bridge hold its events, and all four hold (b included).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.app import Bridge
from callbridge.simulator import Simulator
from tests.support.bridges import MakeService, sim_config
from tests.support.metrics import sample
from tests.support.receivers import Receiver
from tests.support.rewind import (
    ReplicatedRedis,
    copy_keyspace,
    ids_with_two_bodies,
    kept,
    restore_keyspace,
    sequences_under_two_ids,
    start_replicated,
    wait_linked,
)
from tests.support.settings import SECRET


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicatedRedis]:
    yield from start_replicated(tmp_path_factory.mktemp("replicated"))


class Rewind:
    """One bridge, its simulator and receiver, and the Redis it uses, rewound on demand."""

    def __init__(
        self,
        svc: Bridge,
        sim: Simulator,
        receiver: Receiver,
        client: aioredis.Redis,
        pair: ReplicatedRedis | None,
    ) -> None:
        self.svc, self.sim, self.receiver = svc, sim, receiver
        self.client, self.pair = client, pair
        self.batch = sim.batch_ids[0]
        self.calls = [c["call_id"] for c in sim.calls(self.batch)]
        self._copy: list[tuple[bytes, int, bytes]] = []

    def set(self, index: int, **fields: Any) -> None:
        self.sim.set_call(self.batch, self.calls[index], **fields)

    async def step(self) -> None:
        """Poll until a cycle is not fenced (the first after a rewind finds the snapshot
        older than what it committed), then deliver what is due."""
        for _ in range(3):
            if await self.svc.poller.poll_once(self.batch) != "fenced":
                break
        await self.svc.deliverer.drain()

    async def mark(self) -> None:
        """What the promoted replica will hold: everything so far, nothing after. With a
        replica, it stops acknowledging from here."""
        if self.pair is not None:
            await self.pair.synced(self.client)
        self._copy = await copy_keyspace(self.client)
        if self.pair is not None:
            self.pair.stop_acks()

    async def failover(self) -> None:
        """The primary dies; the replica that holds the copy takes over."""
        await restore_keyspace(self.client, self._copy)
        if self.pair is not None:
            # The old primary comes back as the new one's replica (as Sentinel makes it).
            self.pair.resume_acks()
            await self.pair.synced(self.client)

    def check(self, *, all_four: bool) -> None:
        self.receiver.verify_all(SECRET)
        twice = ids_with_two_bodies(self.receiver)
        assert not twice, [r.body for r in self.receiver.received if r.id in twice]
        if all_four:
            reused = sequences_under_two_ids(self.receiver)
            assert not reused, [r.body for r in self.receiver.delivered]


Start = Callable[[int], Awaitable[Rewind]]


@pytest.fixture(params=[0, 1], ids=["acks0", "acks1"])
async def start(
    request: pytest.FixtureRequest, make_service: MakeService, redis_client: aioredis.Redis
) -> AsyncIterator[Start]:
    acks: int = request.param
    opened: list[aioredis.Redis] = []

    async def build(calls: int) -> Rewind:
        redis_section: dict[str, Any] = {}
        client, pair = redis_client, None
        if acks:
            pair = request.getfixturevalue("replicated")
            client = aioredis.Redis.from_url(pair.url)
            opened.append(client)
            await client.flushdb()
            await wait_linked(client)
            await pair.synced(client)
            redis_section = {
                "url": pair.url,
                "min_replicas_to_ack": acks,
                "replica_ack_timeout_seconds": 0.3,
            }
        svc, sim, receiver = await make_service(
            sim_config(batches=1, calls_per_batch=calls), redis=redis_section
        )
        return Rewind(svc, sim, receiver, client, pair)

    yield build
    if acks:
        request.getfixturevalue("replicated").resume_acks()
    for client in opened:
        await client.aclose()


def held(rw: Rewind) -> None:
    """With a replica: the commit it never acknowledged was never handed on."""
    if rw.pair is not None:
        assert (sample(rw.svc.metrics, "redis_wait_timeouts_total") or 0) >= 1


async def test_a_the_same_change_seen_again_keeps_its_body_under_its_id(start: Start) -> None:
    """(a) Re-diffed after the rewind, the same transition gets a new `timestamp`: on main
    the same id went out with a second body."""
    rw = await start(1)
    rw.set(0, status="ringing")
    await rw.step()
    await rw.mark()
    rw.set(0, status="answered")
    await rw.step()
    await rw.failover()
    await rw.step()  # the call is still answered: the change is seen again
    rw.check(all_four=rw.pair is not None)
    statuses = [p["data"]["status"] for p in kept(rw.receiver)]
    assert "answered" in statuses
    held(rw)


async def test_b_a_sequence_is_never_reused_for_another_change(
    start: Start, request: pytest.FixtureRequest
) -> None:
    """(b) The call moved on while the primary died: on main the next change took the
    lost event's sequence under another id (answered and completed both sequence 2)."""
    rw = await start(1)
    if rw.pair is None:
        # Kept as a strict xfail: it shows the limit README states, and fails the day
        # it no longer holds.
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="min_replicas_to_ack: 0 cannot keep a call's sequence numbers "
                "through a rewind of delivered events (README, 'What a failover can and "
                "cannot lose')",
            )
        )
    rw.set(0, status="ringing")
    await rw.step()
    await rw.mark()
    rw.set(0, status="answered")
    await rw.step()
    await rw.failover()
    rw.set(0, status="completed")
    await rw.step()
    rw.check(all_four=True)
    calls = [p["data"] for p in kept(rw.receiver) if p["type"].startswith("call.")]
    chain = [(d["sequence"], d["status"], d["previous_status"]) for d in calls]
    assert chain == [(1, "ringing", None), (2, "completed", "ringing")]
    held(rw)


async def test_c_a_different_update_is_not_deduplicated_away(start: Start) -> None:
    """(c) Another update after the rewind: on main it had the id of the lost one, and a
    receiver that deduplicates kept the lost update's name."""
    rw = await start(1)
    rw.set(0, status="answered", name="Ann")
    await rw.step()
    await rw.mark()
    rw.set(0, name="Ann X")
    await rw.step()
    await rw.failover()
    rw.set(0, name="Ann Y")
    await rw.step()
    rw.check(all_four=rw.pair is not None)
    updates = [p for p in kept(rw.receiver) if p["type"] == "call.updated"]
    assert updates[-1]["data"]["call"]["name"] == "Ann Y"
    held(rw)


async def test_d_a_later_completion_is_not_deduplicated_away(start: Start) -> None:
    """(d) The batch completed, the primary died, the call was redialled and ended
    otherwise: on main the second completion had the first one's id (a completions
    counter), and a receiver that deduplicates kept the wrong counts."""
    rw = await start(2)
    rw.set(0, status="completed")
    rw.set(1, status="ringing")
    await rw.step()
    await rw.mark()
    rw.set(1, status="completed")
    await rw.step()
    await rw.failover()
    rw.set(1, status="ringing")  # redialled: the bridge knew it ringing all along
    rw.set(1, status="busy")
    await rw.step()
    rw.check(all_four=rw.pair is not None)
    completions = [p["data"] for p in kept(rw.receiver) if p["type"] == "batch.completed"]
    assert completions
    assert completions[-1]["counts"] == {"busy": 1, "completed": 1}
    assert completions[-1]["total"] == 2
    held(rw)


async def ringing_with_a_replica(start: Start) -> Rewind:
    """A bridge with a replica to acknowledge (acks 1 only), its first call ringing and
    delivered."""
    rw = await start(1)
    if rw.pair is None:
        pytest.skip("about min_replicas_to_ack: 1")
    rw.set(0, status="ringing")
    await rw.step()
    return rw


async def test_events_wait_for_a_lagging_replica_then_leave_in_order(start: Start) -> None:
    """No failover: the replica only falls behind. The bridge goes on polling and
    committing, the events wait in the outbox, and leave in order once it catches up."""
    rw = await ringing_with_a_replica(start)
    rw.pair.stop_acks()
    try:
        rw.set(0, status="answered")
        await rw.step()
        rw.set(0, status="completed")
        await rw.step()
        assert [p["type"] for p in kept(rw.receiver)] == ["call.ringing"]
    finally:
        rw.pair.resume_acks()
    await rw.pair.synced(rw.client)
    await rw.step()
    rw.check(all_four=True)
    calls = [p["data"] for p in kept(rw.receiver) if p["type"].startswith("call.")]
    assert [(d["sequence"], d["status"]) for d in calls] == [
        (1, "ringing"),
        (2, "answered"),
        (3, "completed"),
    ]
    assert (sample(rw.svc.metrics, "redis_wait_timeouts_total") or 0) >= 2


async def test_a_lease_taken_on_the_lost_primary_stops_its_holder_at_once(
    make_service: MakeService, redis_client: aioredis.Redis
) -> None:
    """Fencing through a rewind: replica B took the batch on the primary that died; the
    promoted replica still names A. B finds out at its next look and never commits; A
    carries on. Tokens are never reissued (random per acquisition), so a rewound lease
    names an older owner, never a second holder of a token still in use."""
    svc_a, sim, _receiver = await make_service(sim_config(batches=1, calls_per_batch=1))
    svc_b = await Bridge.create(svc_a.settings, replica_id="b")
    try:
        batch = sim.batch_ids[0]
        call = sim.calls(batch)[0]["call_id"]
        sim.set_call(batch, call, status="ringing")
        assert await svc_a.poller.poll_once(batch) == "committed"
        copy = await copy_keyspace(redis_client)
        token_a = await svc_a.leases.owner(batch)
        await svc_a.poller.release_all()
        sim.set_call(batch, call, status="answered")
        assert await svc_b.poller.poll_once(batch) == "committed"
        token_b = await svc_b.leases.owner(batch)
        await restore_keyspace(redis_client, copy)
        sim.set_call(batch, call, status="completed")
        assert await svc_b.poller.poll_once(batch) == "not_owner"
        assert not svc_b.poller.owns(batch)
        assert await svc_a.poller.poll_once(batch) == "committed"
        assert await svc_b.poller.poll_once(batch) == "not_owner"
        token_a2 = await svc_a.leases.owner(batch)
        assert len({token_a, token_b, token_a2}) == 3
        assert sample(svc_b.metrics, "poll_cycles_total", batch=batch, outcome="fenced") in (
            None,
            0,
        )
        state = await svc_a.store.call_state(batch, call)
        assert state is not None
        assert state.status == "completed"
    finally:
        await svc_b.close()


async def test_held_events_leave_after_cycles_that_committed_nothing(start: Start) -> None:
    """A cycle whose drain was held and that committed nothing marked the outbox clean:
    no later cycle drained it, and a campaign's last events (nothing changes after
    them) never left — 10 final statuses in a Sentinel run with the primary killed near
    the end of the campaign."""
    rw = await ringing_with_a_replica(start)
    rw.pair.stop_acks()
    try:
        rw.set(0, status="completed")
        await rw.step()  # committed, held
        await rw.step()  # nothing changed: its drain is held too
        assert [p["type"] for p in kept(rw.receiver)] == ["call.ringing"]
    finally:
        rw.pair.resume_acks()
    await rw.pair.synced(rw.client)
    await rw.step()  # nothing changes any more: the outbox must still be drained
    assert [p["type"] for p in kept(rw.receiver)] == [
        "call.ringing",
        "call.completed",
        "batch.completed",
    ]
