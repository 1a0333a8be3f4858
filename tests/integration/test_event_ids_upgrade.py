"""A rolling upgrade across the change of event ids (issue 21, part 2): ids became a digest
of the body, and the timeline stores them (a fifth field). A replica of this release
must carry on from what the previous release left in Redis: events it committed keep
their ids (they wait in the outbox with them), and its timeline entries (four fields,
no id) still name their events and deliveries."""

from __future__ import annotations

from callbridge.models import Event, TimelineEntry, event_id_v1, iso_ms
from callbridge.store.callstate import CallState, Fingerprint
from callbridge.store.snapshots import BatchMeta
from tests.support.bridges import MakeService, sim_config
from tests.support.settings import SECRET


async def test_a_new_replica_carries_on_from_the_previous_releases_state(
    make_service: MakeService,
) -> None:
    svc, sim, receiver = await make_service(sim_config(batches=1, calls_per_batch=1))
    batch = sim.batch_ids[0]
    call = sim.calls(batch)[0]
    call_id = call["call_id"]
    sim.set_call(batch, call_id, status="ringing")
    ringing = next(c for c in sim.calls(batch) if c["call_id"] == call_id)
    # The previous release's commit, as it wrote it, left in the outbox by a replica that
    # died before its fan-out: the id from (batch, call, sequence, type) alone, and a
    # timeline entry of four fields.
    old_id = event_id_v1(batch, call_id, 1, "call.ringing")
    now_ms = 1_790_000_000_000
    old_event = Event.build(
        event_id=old_id,
        type="call.ringing",
        timestamp=iso_ms(now_ms),
        batch_id=batch,
        call_id=call_id,
        data={
            "batch_id": batch,
            "call_id": call_id,
            "external_id": ringing["external_id"],
            "status": "ringing",
            "previous_status": None,
            "sequence": 1,
            "initial": True,
            "skipped_statuses": [],
            "missed_terminal": False,
            "call": ringing,
        },
    )
    lease = await svc.leases.acquire(batch, "old-replica:1", 10_000)
    assert lease
    await svc.store.commit(
        batch,
        token="old-replica:1",
        expected_version=0,
        lease_ttl_ms=10_000,
        states={call_id: CallState("ringing", 1, Fingerprint.of(ringing)).encode()},
        events=[old_event],
        timeline=[TimelineEntry(call_id, now_ms, "ringing", 1, "call.ringing")],
        timeline_max=20,
        meta=BatchMeta(counts={"ringing": 1}, last_poll_ms=now_ms, last_change_ms=now_ms),
    )
    await svc.leases.release(batch, "old-replica:1")

    # This release takes over: the old event goes out under its id, then a new one.
    assert await svc.poller.poll_once(batch) == "unchanged"
    sim.set_call(batch, call_id, status="answered")
    assert await svc.poller.poll_once(batch) == "committed"
    await svc.deliverer.drain()
    receiver.verify_all(SECRET)
    delivered = [(r.id, r.payload()["type"]) for r in receiver.delivered]
    assert delivered[0] == (old_id, "call.ringing")
    assert [t for _, t in delivered] == ["call.ringing", "call.answered"]
    new_id = delivered[1][0]
    assert new_id != event_id_v1(batch, call_id, 2, "call.answered")

    # The timeline mixes both forms and names both events, with their deliveries.
    timeline = await svc.operations.timeline(batch, call_id)
    assert timeline is not None
    named = [(e["event_type"], e["event_id"]) for e in timeline["timeline"]]
    assert named == [("call.ringing", old_id), ("call.answered", new_id)]
    assert all(e["deliveries"][0]["state"] == "delivered" for e in timeline["timeline"])
