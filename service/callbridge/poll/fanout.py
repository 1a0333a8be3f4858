"""Handing committed events on to the deliver stage, in commit order, in the background.

The poll stage never imports the deliver stage: it hands events to an `EventSink`,
which the wiring (`app`) fills with the deliver stage's relay. The outbox in Redis is
the contract between the two; the sink only moves what it holds on, idempotently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from callbridge.errors import ReplicationLagError
from callbridge.models import Event

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """Where committed events go (`deliver.relay.Relay`). Both calls are idempotent: an
    event already handed on is not handed on twice, whatever crashed in between."""

    async def drain(self, batch_id: str) -> int:
        """Hand on everything the batch's outbox holds; how many events."""

    async def publish(self, batch_id: str, events: Sequence[tuple[Event, bytes]]) -> None:
        """Hand on events just committed (with their outbox stream ids)."""


async def drained(sink: EventSink, batch_id: str) -> bool:
    """`sink.drain`: whether the outbox was handed on. False when the replicas have
    not confirmed its commits yet (`redis.min_replicas_to_ack`): its events wait there,
    and the cycle goes on polling and committing (what it sees is kept, held the same
    way) instead of failing; the next cycle drains again."""
    try:
        await sink.drain(batch_id)
    except ReplicationLagError as exc:
        log.warning("%s", exc, extra={"action": "events_held", "batch_id": batch_id})
        return False
    return True


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

    def __init__(self, sink: EventSink, batch_id: str) -> None:
        self._sink = sink
        self._batch_id = batch_id
        self._last: asyncio.Task[None] | None = None

    def publish(self, events: Sequence[tuple[Event, bytes]]) -> None:
        """Fan out events just committed (with their outbox ids), after those before."""
        self._then(lambda: self._sink.publish(self._batch_id, events))

    def drain(self) -> None:
        """Fan out the whole outbox, after the fan-outs handed over before."""
        self._then(lambda: self._sink.drain(self._batch_id))

    @property
    def ran(self) -> bool:
        """Whether any fan-out was handed over (a drain of a held batch's outbox among
        them: `Relay.publish` drains it whole first)."""
        return self._last is not None

    async def wait(self) -> None:
        """Until every fan-out handed over has ended; raises the first one's error."""
        if self._last is not None:
            await asyncio.shield(self._last)

    async def succeeded(self) -> bool:
        """`wait`, logging a failure instead of raising it: whether every fan-out
        succeeded. A failed one does not undo the commits before it: their events wait
        in the outbox for the next cycle, which drains it first, in order."""
        try:
            await self.wait()
        except Exception as exc:
            log.warning(
                "batch %s: committed, but handing its events on failed; they wait in the "
                "outbox for the next cycle: %r",
                self._batch_id,
                exc,
                extra={"action": "fanout_failed", "batch_id": self._batch_id},
            )
            return False
        return True

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
