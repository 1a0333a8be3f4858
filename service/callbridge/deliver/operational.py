"""Operational events: an on-call channel hears about a failing receiver without scraping.

The delivery scripts append to a subscription's ``ops`` stream, in the same atomic step
as the change itself, when its breaker opens, when it recovers, when it is disabled and
when one of its deliveries is dead-lettered (_outcomes.lua, enqueue.lua). The
subscription's delivery loop hands them on here: each becomes a signed event, enqueued
like any other for every subscription that asked for it by name, then the stream entry
goes. Crash-safe like the relay: ids are derived from the stream entry, so handing the
same entry on twice enqueues nothing new.

Who gets them: subscriptions whose ``events`` name the type or its family
(``subscription.*``, ``delivery.dead_lettered``); ``*`` does not include them, so a
CRM listening to everything keeps getting call events only. Never the subscription an
event is about (it is failing), and never a dead letter of an operational event
itself (two failing on-call endpoints would otherwise feed each other forever).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

from callbridge.config import SubscriptionSettings
from callbridge.models import Event, iso_ms
from callbridge.store.queue import DeliveryQueue

log = logging.getLogger(__name__)

OPERATIONAL_TYPES = (
    "subscription.breaker_opened",
    "subscription.recovered",
    "subscription.disabled",
    "delivery.dead_lettered",
)
_FAMILIES = frozenset(t.split(".", 1)[0] for t in OPERATIONAL_TYPES)


def is_operational(event_type: str) -> bool:
    return event_type.split(".", 1)[0] in _FAMILIES


def wants_operational(sub: SubscriptionSettings, event_type: str, about: str) -> bool:
    """Whether `sub` gets operational event `event_type` about subscription `about`."""
    if sub.name == about or not sub.enabled:
        return False
    family = event_type.split(".", 1)[0]
    return any(p in (event_type, f"{family}.*") for p in sub.events)


def build_event(about: str, stream_id: bytes, fields: dict[str, str]) -> Event | None:
    """The event of one ``ops`` stream entry; None for an entry not to hand on."""
    kind = fields.get("type", "")
    if kind not in OPERATIONAL_TYPES:
        return None
    if kind == "delivery.dead_lettered" and is_operational(fields.get("event_type", "")):
        return None
    at_ms = int(fields.get("at") or 0)
    data: dict[str, object] = {"subscription": about, "at": iso_ms(at_ms)}
    if kind.startswith("subscription."):
        since = int(fields.get("failing_since") or 0)
        data["reason"] = fields.get("reason") or None
        data["failing_since"] = iso_ms(since) if since > 0 else None
    else:
        data["event_id"] = fields.get("event_id", "")
        data["event_type"] = fields.get("event_type", "")
        data["attempts"] = int(fields.get("attempts") or 0)
        data["last_error"] = fields.get("last_error") or None
    digest = hashlib.sha256(f"{about}\0{stream_id.decode()}".encode()).hexdigest()[:24]
    # Ordered like a call's events (first attempt before the next one starts): an
    # on-call channel hears "opened" before "recovered".
    return Event.build(
        event_id=f"op_{digest}",
        type=kind,
        timestamp=iso_ms(at_ms),
        batch_id="",
        call_id=f"ops:{about}",
        data=data,
    )


class OperationalEvents:
    """Hands a subscription's operational events on to the subscriptions that want them."""

    def __init__(
        self,
        queue: DeliveryQueue,
        subscriptions: Sequence[SubscriptionSettings],
        *,
        max_backlog: int,
        dead_retention_ms: int,
        on_enqueued: Callable[[str], None],
    ) -> None:
        self._queue = queue
        self._subs = list(subscriptions)
        self._max_backlog = max_backlog
        self._dead_retention_ms = dead_retention_ms
        self._on_enqueued = on_enqueued

    def backlog_bound(self, sub: SubscriptionSettings) -> int:
        """The undelivered deliveries `sub` may hold (its own bound, or the default)."""
        return sub.max_backlog or self._max_backlog

    async def hand_on(self, about: str) -> int:
        """Move what `about`'s ``ops`` stream holds (a page) into the queues of the
        subscriptions that want it; how many events were handed on."""
        rows = await self._queue.ops_events(about)
        if not rows:
            return 0
        per_sub: dict[str, list[tuple[Event, int]]] = {}
        handed = 0
        for stream_id, fields in rows:
            event = build_event(about, stream_id, fields)
            if event is None:
                continue
            at_ms = int(fields.get("at") or 0)
            for sub in self._subs:
                if wants_operational(sub, event.type, about):
                    per_sub.setdefault(sub.name, []).append((event, at_ms))
                    handed += 1
            log.info(
                "%s: %s",
                event.type,
                about,
                extra={"action": "operational_event", "subscription": about},
            )
        for name, events in per_sub.items():
            sub = next(s for s in self._subs if s.name == name)
            added, _ = await self._queue.enqueue(
                name,
                events,
                max_backlog=self.backlog_bound(sub),
                dead_retention_ms=self._dead_retention_ms,
            )
            if added:
                self._on_enqueued(name)
        # Only once every delivery exists (as the relay trims its outbox).
        await self._queue.ack_ops(about, [sid for sid, _ in rows])
        return handed
