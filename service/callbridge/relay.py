"""Fan-out: moves committed events from a batch's outbox to subscription queues.

The outbox lives in the batch's hash slot and the queues in each subscription's,
so no single atomic step can cover both. Instead every step is idempotent:
enqueueing a delivery that already exists does nothing, and an outbox entry is
deleted only after all its deliveries exist. A crash anywhere in between makes
the next drain redo the same work, never lose it or create it under a new id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from callbridge.config import SubscriptionSettings
from callbridge.metrics import Metrics
from callbridge.models import Event
from callbridge.store.queue import DeliveryQueue
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
    ) -> None:
        self._store = store
        self._queue = queue
        self._subs = list(subscriptions)
        self._on_enqueued = on_enqueued
        self._chunk = chunk
        self._max_backlog = max_backlog
        self._backlogs = {s.name: s.max_backlog for s in self._subs}
        self._dead_retention_ms = dead_retention_ms
        self._metrics = metrics
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
        if self._metrics is not None:
            self._metrics.dead_letters.labels(name).inc(n)
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
            await self.publish(
                batch_id,
                [
                    (
                        Event(
                            id=e.event_id,
                            type=e.type,
                            batch_id=batch_id,
                            call_id=e.call_id or None,
                            body=e.body,
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


class FanOut:
    """A cycle's fan-outs, run one after the other in commit order, in the background.

    A scan commits its pages in groups (`group_commit`); awaiting each group's fan-out
    before diffing the next left the bridge idle while Valkey enqueued (about half of a
    flood's poll cycle, issue 13). Here the cycle goes on while the last group's
    deliveries are enqueued. Order still holds: each fan-out starts when the one before
    it has ended, so a call's events are queued in the order they were committed, and
    one that fails stops those after it (their events stay in the outbox, which the
    next cycle drains first, in order). The cycle waits for all of them (`wait`)
    before it counts as done.
    """

    def __init__(self, relay: Relay, batch_id: str) -> None:
        self._relay = relay
        self._batch_id = batch_id
        self._last: asyncio.Task[None] | None = None

    def publish(self, events: Sequence[tuple[Event, bytes]]) -> None:
        """Fan out events just committed (with their outbox ids), after those before."""
        self._then(lambda: self._relay.publish(self._batch_id, events))

    def drain(self) -> None:
        """Fan out the whole outbox, after the fan-outs handed over before."""
        self._then(lambda: self._relay.drain(self._batch_id))

    async def wait(self) -> None:
        """Until every fan-out handed over has ended; raises the first one's error."""
        if self._last is not None:
            await asyncio.shield(self._last)

    async def settle(self) -> None:
        """`wait`, keeping quiet about an error (on the way out of a cycle that failed:
        the events of a failed fan-out stay in the outbox)."""
        if self._last is not None:
            await asyncio.gather(self._last, return_exceptions=True)

    def _then(self, step: Callable[[], Awaitable[Any]]) -> None:
        self._last = asyncio.create_task(self._after(self._last, step))

    @staticmethod
    async def _after(before: asyncio.Task[None] | None, step: Callable[[], Awaitable[Any]]) -> None:
        if before is not None:
            await before  # raises what it raised: nothing after a failed fan-out
        await step()
