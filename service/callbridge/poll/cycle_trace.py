"""The poll stage's spans: a cycle, its commits, and one span per committed event.

The cycle's span is current while it runs, so its upstream requests' spans
(`UpstreamClient`) are its children and its log records carry its ids. Each commit
is a span of the cycle's (found through the batch's cache: a group commit runs in a
task of its own); each event committed in it gets a PRODUCER span of the commit's,
whose context is stored with the event (`Event.trace`): its delivery attempts, on
any replica and after any restart, are children of it (`deliver.attempt`).

With tracing off every method hands its work through untouched and builds nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from callbridge.models import Event, PollOutcome
from callbridge.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span


@dataclass(slots=True)
class CycleTrace:
    """The running cycle's span, and what its attributes add up."""

    span: Span
    events: int = 0


class Traced(Protocol):
    """What the tracer needs of a batch's cache (`BatchCache`)."""

    batch_id: str
    trace: CycleTrace | None


R = TypeVar("R", bound=Traced)


class CycleTracer:
    def __init__(self, tracing: Tracing) -> None:
        self._t = tracing

    async def cycle(self, rt: R, run: Callable[[R], Awaitable[PollOutcome]]) -> PollOutcome:
        """`run(rt)`, the whole cycle, in its span (the root of its trace)."""
        if not self._t.enabled:
            return await run(rt)
        t = self._t
        span = t.span("poll cycle", attributes={"callbridge.batch_id": rt.batch_id})
        rt.trace = trace = CycleTrace(span)
        try:
            with t.current(span):
                outcome = await run(rt)
            span.set_attributes(
                {"callbridge.poll.outcome": outcome, "callbridge.changes": trace.events}
            )
            if outcome in ("failed", "fenced", "auth_failed"):
                t.fail(span, outcome)
            return outcome
        finally:
            rt.trace = None
            span.end()

    def read(self, plan: str, reason: str, requests: int, partial: bool) -> None:
        """What the cycle read (`BatchReader`), on the cycle's span (the current one)."""
        if self._t.enabled:
            self._t.annotate({
                "callbridge.scan.plan": plan,
                "callbridge.scan.reason": reason,
                "callbridge.pages_read": requests,
                "callbridge.scan.partial": partial,
            })  # fmt: skip

    @contextmanager
    def commit(self, rt: Traced, events: list[Event], *, final: bool) -> Iterator[list[Event]]:
        """A commit's span around the block; yields `events`, each with its trace
        context (its own span's, a child of the commit's), for the block to commit."""
        if not self._t.enabled:
            yield events
            return
        t = self._t
        cycle = rt.trace
        span = t.span(
            "commit",
            parent=cycle.span if cycle is not None else None,
            attributes={
                "callbridge.batch_id": rt.batch_id,
                "callbridge.events": len(events),
                "callbridge.commit.final": final,
            },
        )
        link = cycle.span if cycle is not None else span
        spans = []
        traced = []
        for event in events:
            attributes = {"callbridge.event_id": event.id, "callbridge.event_type": event.type}
            if event.call_id:
                attributes["callbridge.call_id"] = event.call_id
            own = t.span(f"event {event.type}", kind="producer", parent=span, attributes=attributes)
            spans.append(own)
            traced.append(dataclasses.replace(event, trace=t.stored(own, link)))
        try:
            with t.current(span):
                yield traced
        except BaseException as exc:
            t.fail(span, type(exc).__name__)
            raise
        finally:
            for own in spans:
                own.end()
            span.end()
        if cycle is not None:
            cycle.events += len(events)
