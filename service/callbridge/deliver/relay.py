"""Fan-out: moves committed events from a batch's outbox to subscription queues.

The outbox lives in the batch's hash slot and the queues in each subscription's,
so no single atomic step can cover both. Instead every step is idempotent:
enqueueing a delivery that already exists does nothing, and an outbox entry is
deleted only after all its deliveries exist. A crash anywhere in between makes
the next drain redo the same work, never lose it or create it under a new id.

With `redis.min_replicas_to_ack` (`store.replication`), events go on only once the
replicas confirmed their commits: a fan-out that finds them behind leaves its events
in the outbox and holds the batch; the batch's next fan-out drains the outbox instead,
so older events are never overtaken by newer ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from callbridge.config import SubscriptionSettings
from callbridge.errors import ReplicationLagError
from callbridge.metrics import Metrics
from callbridge.models import Event
from callbridge.store.queue import DeliveryQueue
from callbridge.store.replication import ReplicaAcks
from callbridge.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)


def matches(sub: SubscriptionSettings, event_type: str, batch_id: str) -> bool:
    """Whether `sub` wants an event: exact type, ``family.*`` or ``*``; optional batch filter."""
    if sub.batches is not None and batch_id not in sub.batches:
        return False
    family = event_type.split(".", 1)[0]
    return any(p in ("*", event_type) or p == f"{family}.*" for p in sub.events)


class Relay:
    """Drains batch outboxes into delivery queues."""

    def __init__(
        self,
        store: SnapshotStore,
        queue: DeliveryQueue,
        subscriptions: Sequence[SubscriptionSettings],
        *,
        on_enqueued: Callable[[str], None] | None = None,
        chunk: int = 500,
        max_backlog: int = 2**62,
        dead_retention_ms: int = 14 * 86_400_000,
        metrics: Metrics | None = None,
        acks: ReplicaAcks | None = None,
    ) -> None:
        self._store = store
        self._acks = acks
        # Batches whose last fan-out the replicas did not confirm: events wait in the outbox.
        self._held: set[str] = set()
        self._queue = queue
        self._subs = list(subscriptions)
        self._on_enqueued = on_enqueued
        self._chunk = chunk
        self._max_backlog = max_backlog
        self._backlogs = {s.name: s.max_backlog for s in self._subs}
        self._dead_retention_ms = dead_retention_ms
        self._metrics = metrics  # for the WAIT timeouts (dead letters: the queue's on_dead)
        # (event type, batch id) -> names of the subscriptions that want it: asked per
        # event of a flood, answered once (the subscriptions are fixed for a process).
        self._wants: dict[tuple[str, str], list[str]] = {}

    def _wanted_by(self, event_type: str, batch_id: str) -> list[str]:
        names = self._wants.get((event_type, batch_id))
        if names is None:
            # A subscription disabled in the config collects nothing.
            names = [
                sub.name for sub in self._subs if sub.enabled and matches(sub, event_type, batch_id)
            ]
            if len(self._wants) > 10_000:  # batch ids keep coming: stay bounded
                self._wants.clear()
            self._wants[(event_type, batch_id)] = names
        return names

    def _on_overflow(self, name: str, n: int) -> None:
        # Counted in dead_letters_total by the queue (DeliveryQueue's on_dead).
        log.error(
            "subscription %s holds %d undelivered deliveries (its max_backlog): "
            "%d new ones went to its dead letters, replayable once it catches up",
            name,
            self._backlogs.get(name) or self._max_backlog,
            n,
            extra={"action": "backlog_full", "subscription": name},
        )

    async def drain(self, batch_id: str) -> int:
        """Fan out everything in the batch's outbox; returns the number of events moved.

        The recovery path: after a takeover, or when a fan-out from memory failed.
        """
        moved = 0
        while True:
            entries = await self._store.read_outbox(batch_id, self._chunk)
            if not entries:
                return moved
            # After the read: the confirmation covers every entry read.
            await self._confirm(batch_id)
            await self._enqueue(
                batch_id,
                [
                    (
                        Event(
                            id=e.event_id,
                            type=e.type,
                            batch_id=batch_id,
                            call_id=e.call_id or None,
                            body=e.body,
                            trace=e.trace,
                        ),
                        e.stream_id,
                    )
                    for e in entries
                ],
            )
            moved += len(entries)
            if len(entries) < self._chunk:
                return moved

    async def publish(self, batch_id: str, events: Sequence[tuple[Event, bytes]]) -> None:
        """Enqueue committed events (with their outbox ids) and trim them from the outbox."""
        if batch_id in self._held:
            # Older events wait in the outbox: they go first, these with them.
            await self.drain(batch_id)
            return
        await self._confirm(batch_id)
        await self._enqueue(batch_id, events)

    async def _confirm(self, batch_id: str) -> None:
        """Return once the replicas hold the batch's commits (`min_replicas_to_ack`);
        otherwise hold the batch and raise `ReplicationLagError`."""
        if self._acks is None:
            return
        self._held.add(batch_id)  # until confirmed, whatever goes wrong on the way
        acks = await self._acks.wait(batch_id)
        if acks < self._acks.replicas:
            if self._metrics is not None:
                self._metrics.redis_wait_timeouts.inc()
            raise ReplicationLagError(
                f"batch {batch_id}: {acks} of {self._acks.replicas} replicas confirmed its "
                "commits in time; its events wait in the outbox"
            )
        self._held.discard(batch_id)

    async def _enqueue(self, batch_id: str, events: Sequence[tuple[Event, bytes]]) -> None:
        for start in range(0, len(events), self._chunk):
            chunk = events[start : start + self._chunk]
            per_sub: dict[str, list[tuple[Event, int]]] = {}
            # When a change was committed: its stream id's millisecond part, which one
            # commit's entries share (parsed once per run of them).
            last_ms, observed = b"", 0
            for event, stream_id in chunk:
                ms = stream_id.split(b"-", 1)[0]
                if ms != last_ms:
                    last_ms, observed = ms, int(ms)
                for name in self._wanted_by(event.type, batch_id):
                    per_sub.setdefault(name, []).append((event, observed))
            for name, deliveries in per_sub.items():
                added, overflow = await self._queue.enqueue(
                    name,
                    deliveries,
                    max_backlog=self._backlogs.get(name) or self._max_backlog,
                    dead_retention_ms=self._dead_retention_ms,
                )
                if overflow:
                    self._on_overflow(name, overflow)
                if added > overflow and self._on_enqueued is not None:
                    self._on_enqueued(name)
            # Only once every delivery exists: a crash before this line re-enqueues
            # the same ids (a no-op), a crash after it has nothing left to do.
            await self._store.trim_outbox(batch_id, [sid for _, sid in chunk])
