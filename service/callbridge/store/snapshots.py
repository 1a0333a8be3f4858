"""Batch state in Redis: snapshots, metadata, leases, timelines and the outbox.

The one write that matters - new call states plus the events they produce - is a
single Lua script over keys of one hash slot (``{b:<batch>}``). It first checks the
caller still holds the batch lease (fencing: a replica that lost its lease can
never write again) and that the snapshot version is the one it diffed against,
so a crash at any instant leaves either the whole cycle or none of it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
from redis.exceptions import ResponseError

from callbridge.errors import LeaseLostError, StoreError
from callbridge.models import Event, TimelineEntry, event_id_v1
from callbridge.store.callstate import CallState, CallStates
from callbridge.store.connection import Redis
from callbridge.store.keys import Keys
from callbridge.store.scripts import register

log = logging.getLogger(__name__)
_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])


@dataclass(slots=True)
class BatchMeta:
    """Facts about a batch kept beside its snapshot."""

    version: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    completed: bool = False
    completions: int = 0
    last_poll_ms: int = 0
    last_change_ms: int = 0
    completed_at_ms: int = 0
    not_found_since_ms: int = 0
    # Items of calls seen going backwards, not confirmed yet (`poll.second_look.Suspect`), as
    # served. Stored as ``<commit_id>\n<JSON array>``: read back only when the commit
    # that wrote them is the last one (a replica of an older release commits without
    # them, and what they said may no longer hold).
    suspects: list[bytes] = field(default_factory=list)
    # Those of them the platform served twice (call ids), stored the same way
    # (``<commit_id>\n<JSON array>``; none from an older release).
    suspects_twice: list[str] = field(default_factory=list)
    # The plan the last cycle read with (full, active) and why; "" before any.
    scan_plan: str = ""
    scan_reason: str = ""
    # Calls the last full scans that read every page did not serve: call_id -> when
    # first missed (ms); reported removed after `vanished_call_seconds` (`batch_end`).
    vanished: dict[str, int] = field(default_factory=dict)
    # Why the batch ended without completing ("not_found"); "" while it has not.
    ended: str = ""

    @classmethod
    def from_redis(cls, raw: Mapping[bytes, bytes]) -> BatchMeta:
        def num(name: str) -> int:
            value = raw.get(name.encode())
            return int(value) if value else 0

        counts_raw = raw.get(b"counts")
        tag, _, stored = (raw.get(b"suspects") or b"").partition(b"\n")
        suspects: list[bytes] = []
        twice: list[str] = []
        if stored and tag == raw.get(b"commit_id"):
            try:
                suspects = [bytes(r) for r in _RAW_LIST.decode(stored)]
                tag, _, stored = (raw.get(b"suspects_twice") or b"").partition(b"\n")
                if stored and tag == raw.get(b"commit_id"):
                    twice = [str(c) for c in orjson.loads(stored)]
            except (msgspec.DecodeError, orjson.JSONDecodeError):
                log.warning("unreadable suspects in a batch's meta; ignored")
        return cls(
            version=num("version"),
            counts=orjson.loads(counts_raw) if counts_raw else {},
            completed=raw.get(b"completed") == b"1",
            completions=num("completions"),
            last_poll_ms=num("last_poll_ms"),
            last_change_ms=num("last_change_ms"),
            completed_at_ms=num("completed_at_ms"),
            not_found_since_ms=num("not_found_since_ms"),
            suspects=suspects,
            suspects_twice=twice,
            scan_plan=raw.get(b"scan_plan", b"").decode(),
            scan_reason=raw.get(b"scan_reason", b"").decode(),
            vanished=orjson.loads(vanished_raw) if (vanished_raw := raw.get(b"vanished")) else {},
            ended=raw.get(b"ended", b"").decode(),
        )

    def to_fields(self, commit_id: str) -> dict[str, str]:
        """Everything but `version` and `commit_id`, which only the commit script
        changes; `commit_id` tags the suspects."""
        return {
            "counts": orjson.dumps(self.counts).decode(),
            "completed": "1" if self.completed else "0",
            "completions": str(self.completions),
            "last_poll_ms": str(self.last_poll_ms),
            "last_change_ms": str(self.last_change_ms),
            "completed_at_ms": str(self.completed_at_ms),
            "not_found_since_ms": str(self.not_found_since_ms),
            "suspects": f"{commit_id}\n[{','.join(r.decode() for r in self.suspects)}]"
            if self.suspects
            else "",
            "suspects_twice": f"{commit_id}\n{orjson.dumps(self.suspects_twice).decode()}"
            if self.suspects_twice
            else "",
            "scan_plan": self.scan_plan,
            "scan_reason": self.scan_reason,
            "vanished": orjson.dumps(self.vanished).decode() if self.vanished else "",
            "ended": self.ended,
        }


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    stream_id: bytes
    event_id: str
    type: str
    call_id: str
    body: bytes
    trace: str = ""  # absent from entries of tracing off, or of a previous release


class SnapshotStore:
    """Owns every batch-scoped key."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._commit = register(redis, "commit")

    # -- snapshot ----------------------------------------------------------------

    async def load_meta(self, batch_id: str) -> BatchMeta:
        return BatchMeta.from_redis(await self._redis.hgetall(self._keys.batch_meta(batch_id)))

    async def load_metas(self, batch_ids: list[str]) -> list[BatchMeta]:
        """The meta of many batches in one round trip (a cluster client splits it by node)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hgetall(self._keys.batch_meta(batch_id))
            return [BatchMeta.from_redis(raw) for raw in await pipe.execute()]

    async def load(self, batch_id: str) -> tuple[BatchMeta, CallStates]:
        """The whole snapshot of a batch, consistent with the meta version returned.

        States stay encoded (`CallStates` decodes on access). Only the lease holder
        writes, and the caller holds the lease, so the version read before the scan is
        still the version after it; we check anyway.
        """
        for _ in range(5):
            meta = await self.load_meta(batch_id)
            encoded: dict[str, str] = {}
            unreadable = 0
            async for call_id, value in self._redis.hscan_iter(
                self._keys.snapshot(batch_id), count=5000
            ):
                try:
                    encoded[call_id.decode()] = value.decode()
                except UnicodeDecodeError:
                    # Written by something else: the call is seen afresh next cycle.
                    unreadable += 1
            if unreadable:
                log.warning(
                    "batch %s: %d unreadable snapshot entries ignored",
                    batch_id,
                    unreadable,
                    extra={"action": "snapshot_unreadable", "batch_id": batch_id},
                )
            if (await self.load_meta(batch_id)).version == meta.version:
                return meta, CallStates(encoded)
        raise StoreError(f"snapshot of batch {batch_id} kept changing while it was read")

    async def commit(
        self,
        batch_id: str,
        *,
        token: str,
        expected_version: int,
        lease_ttl_ms: int,
        states: Mapping[str, str],
        events: Iterable[Event],
        timeline: Iterable[TimelineEntry],
        timeline_max: int,
        meta: BatchMeta,
    ) -> tuple[int, list[bytes] | None]:
        """Write a cycle's states, events, timeline and meta atomically.

        Returns the new version and the outbox stream ids of `events`, in order;
        None instead of the ids when the reply of the write was lost and the client
        re-sent it (the events are in the outbox; drain it).
        """
        k = self._keys
        events = list(events)
        timeline = list(timeline)
        states_arg: list[str] = []
        for call_id, state in states.items():
            states_arg += (call_id, state)
        events_arg: list[str] = []
        for ev in events:
            events_arg += (ev.id, ev.type, ev.call_id or "", ev.body.decode())
        # Trace contexts, only when tracing is on (the script then stores them).
        traces = [ev.trace for ev in events] if events and events[0].trace else None
        timeline_arg: list[str] = []
        for entry in timeline:
            timeline_arg += (entry.call_id, orjson.dumps(entry.as_list()).decode())
        # Unique per commit: redis-py re-sends a script after a lost reply, and the
        # second run must not fail on the version the first one moved.
        commit_id = uuid.uuid4().hex
        args: list[Any] = [
            token,
            expected_version,
            lease_ttl_ms,
            timeline_max,
            commit_id,
            orjson.dumps(states_arg),
            orjson.dumps(events_arg),
            orjson.dumps(timeline_arg),
            orjson.dumps(meta.to_fields(commit_id)),
        ]
        if traces is not None:
            args.append(orjson.dumps(traces))
        try:
            reply: list[Any] = await self._commit(
                keys=[
                    k.lease(batch_id),
                    k.batch_meta(batch_id),
                    k.snapshot(batch_id),
                    k.outbox(batch_id),
                    k.timeline(batch_id),
                ],
                args=args,
            )
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise LeaseLostError(f"lease on batch {batch_id} lost; cycle discarded") from None
            if str(exc).startswith("CONFLICT"):
                raise LeaseLostError(f"batch {batch_id}: {exc}; cycle discarded") from None
            raise
        if len(reply) == 2 and reply[1] == b"replayed":
            return int(reply[0]), None
        return int(reply[0]), [bytes(s) for s in reply[1:]]

    # -- outbox ------------------------------------------------------------------

    async def read_outbox(self, batch_id: str, count: int = 1000) -> list[OutboxEntry]:
        rows = await self._redis.xrange(self._keys.outbox(batch_id), "-", "+", count=count)
        return [
            OutboxEntry(
                stream_id=sid,
                event_id=f[b"id"].decode(),
                type=f[b"type"].decode(),
                call_id=f[b"call"].decode(),
                body=f[b"body"],
                trace=(f.get(b"trace") or b"").decode(),
            )
            for sid, f in rows
        ]

    async def trim_outbox(self, batch_id: str, stream_ids: list[bytes]) -> None:
        if stream_ids:
            await self._redis.xdel(self._keys.outbox(batch_id), *stream_ids)

    # -- inspection --------------------------------------------------------------

    async def timeline(self, batch_id: str, call_id: str) -> list[dict[str, Any]]:
        """The call's kept observations, each naming its event (None when silent).

        Entries written by a previous release have four fields and no id: theirs is
        recomputed the way that release derived it (`event_id_v1`)."""
        raw = await self._redis.hget(self._keys.timeline(batch_id), call_id)
        if not raw:
            return []
        out = []
        for at, status, seq, etype, *stored in orjson.loads(raw):
            eid = stored[0] if stored else None
            if eid is None and etype:
                eid = event_id_v1(batch_id, call_id, seq, etype)
            out.append(
                {
                    "at_ms": at,
                    "status": status,
                    "sequence": seq,
                    "event_type": etype,
                    "event_id": eid,
                }
            )
        return out

    async def call_state(self, batch_id: str, call_id: str) -> CallState | None:
        raw = await self._redis.hget(self._keys.snapshot(batch_id), call_id)
        return CallState.decode(raw) if raw else None

    async def expire_batch(self, batch_id: str, after_ms: int) -> None:
        """Let a retired batch's state go after `after_ms` (kept for inspection until then).

        Its outbox goes too: it was drained before, and an empty stream would stay.
        """
        for key in self._batch_keys(batch_id):
            await self._redis.pexpire(key, after_ms)

    async def expire_unset(self, batch_id: str, after_ms: int) -> int:
        """Give the batch's keys that have no expiry one, `after_ms` from now (deleted
        when that is not in the future); how many had none. For a batch retired or
        removed whose `expire_batch` never ran (a crash in between) or was undone (a
        commit by an owner that had not heard of it yet)."""
        keys = self._batch_keys(batch_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(key)
            ttls = await pipe.execute()
        unset = [key for key, ttl in zip(keys, ttls, strict=True) if ttl == -1]
        for key in unset:
            if after_ms > 0:
                await self._redis.pexpire(key, after_ms)
            else:
                await self._redis.unlink(key)
        return len(unset)

    def _batch_keys(self, batch_id: str) -> tuple[str, ...]:
        k = self._keys
        return (
            k.snapshot(batch_id),
            k.batch_meta(batch_id),
            k.timeline(batch_id),
            k.outbox(batch_id),
        )
