"""Operator actions and inspection, as a code API (the HTTP admin API calls these).

Everything here reads or changes state in Redis only, so it works the same from
any replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from callbridge.config import Settings
from callbridge.errors import CallbridgeError
from callbridge.models import KNOWN_STATUSES, PENDING, TERMINAL_STATUSES
from callbridge.poll.diff import event_id
from callbridge.poll.lifecycle import batch_lifecycle, interval_s
from callbridge.store.leases import LeaseStore
from callbridge.store.queue import DeliveryQueue
from callbridge.store.registry import BatchRegistry
from callbridge.store.snapshots import SnapshotStore


def redact_url(url: str) -> str:
    """`url` without what often carries capability tokens: userinfo and query values."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(
        f"{k}=***" if v else k for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


class UnknownSubscriptionError(CallbridgeError):
    """No subscription with that name is configured."""


def progress(counts: Mapping[str, int]) -> dict[str, Any]:
    """A batch's calls for a progress bar: pending, active (anything between), each ending.

    Endings come in lifecycle order, and only those that occur.
    """
    ended = {s: counts[s] for s in KNOWN_STATUSES if s in TERMINAL_STATUSES and counts.get(s)}
    pending = counts.get(PENDING, 0)
    return {
        "pending": pending,
        "active": sum(counts.values()) - pending - sum(ended.values()),
        "ended": ended,
    }


class Operations:
    """Inspection and operator actions over the shared state in Redis."""

    def __init__(
        self,
        settings: Settings,
        store: SnapshotStore,
        leases: LeaseStore,
        registry: BatchRegistry,
        queue: DeliveryQueue,
        *,
        owns: Callable[[str], bool] = lambda batch_id: False,
        poll_periods_s: Callable[[], Mapping[str, float]] = dict,
        on_batches_changed: Callable[[], None] = lambda: None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._settings = settings
        self._store = store
        self._leases = leases
        self._registry = registry
        self._queue = queue
        self._owns = owns
        self._poll_periods_s = poll_periods_s
        self._on_batches_changed = on_batches_changed
        self._wall_ms = wall_ms

    def _sub(self, name: str) -> str:
        if self._settings.subscription(name) is None:
            raise UnknownSubscriptionError(f"no subscription named {name!r}")
        return name

    # -- batches ---------------------------------------------------------------------

    async def list_batches(self) -> list[dict[str, Any]]:
        out = []
        registered = sorted(
            (b, reg) for b, reg in (await self._registry.all()).items() if not reg.removed
        )
        ids = [batch_id for batch_id, _ in registered]
        metas = await self._store.load_metas(ids)
        owners = await self._leases.owners(ids)
        periods = self._poll_periods_s()
        for (batch_id, reg), meta, owner in zip(registered, metas, owners, strict=True):
            state = (
                "retired"
                if reg.retired
                else batch_lifecycle(meta, self._wall_ms(), self._settings.poller)
            )
            out.append(
                {
                    "id": batch_id,
                    "source": reg.source,
                    "lifecycle": state,
                    "counts": meta.counts,
                    "progress": progress(meta.counts),
                    "total": sum(meta.counts.values()),
                    "completed": meta.completed,
                    "completions": meta.completions,
                    "last_poll_ms": meta.last_poll_ms or None,
                    "last_change_ms": meta.last_change_ms or None,
                    "owner": owner,
                    "owned_here": self._owns(batch_id),
                    "poll_interval_s": interval_s(state, self._settings.poller),
                    "poll_period_s": periods.get(batch_id),
                    "scan_plan": meta.scan_plan or None,
                    "scan_reason": meta.scan_reason or None,
                }
            )
        return out

    async def add_batch(self, batch_id: str, backfill: bool | None = None) -> bool:
        added = await self._registry.add(batch_id, backfill)
        self._on_batches_changed()
        return added

    async def remove_batch(self, batch_id: str) -> bool:
        """Stop watching a batch. Its state expires after `retired_retention_seconds`
        from now, even if no replica has it in memory to forget (each one that has
        fans out what it committed first); watching it again within that time keeps it."""
        removed = await self._registry.remove(batch_id)
        if removed:
            retention_ms = int(self._settings.poller.retired_retention_seconds * 1000)
            await self._store.expire_batch(batch_id, retention_ms)
        self._on_batches_changed()
        return removed

    async def calls(
        self, batch_id: str, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> dict[str, Any] | None:
        """A page of the batch's calls as last observed (id, status, sequence), by call id.

        Only what the snapshot stores: names and other fields of a call are not kept.
        None when the batch is neither registered nor has a snapshot.
        """
        _, states = await self._store.load(batch_id)
        if not states and ((reg := await self._registry.get(batch_id)) is None or reg.removed):
            return None
        ids = sorted(c for c in states if status is None or states.status(c) == status)
        return {
            "batch_id": batch_id,
            "status": status,
            "items": [
                {"call_id": c, "status": states[c].status, "sequence": states[c].seq}
                for c in ids[offset : offset + limit]
            ],
            "total": len(ids),
            "limit": limit,
            "offset": offset,
        }

    async def timeline(self, batch_id: str, call_id: str) -> dict[str, Any] | None:
        state = await self._store.call_state(batch_id, call_id)
        if state is None:
            return None
        entries = await self._store.timeline(batch_id, call_id)
        for e in entries:
            eid = (
                event_id(batch_id, call_id, e["sequence"], e["event_type"])
                if e["event_type"]
                else None
            )
            e["event_id"] = eid
            e["deliveries"] = await self.deliveries(eid) if eid else []
        return {
            "batch_id": batch_id,
            "call_id": call_id,
            "status": state.status,
            "sequence": state.seq,
            "timeline": entries,
        }

    async def deliveries(self, event_id: str) -> list[dict[str, Any]]:
        """The delivery record of an event in every subscription that has one."""
        out = []
        for sub in self._settings.subscriptions:
            if (record := await self._queue.record(sub.name, event_id)) is not None:
                out.append({"subscription": sub.name, **record})
        return out

    # -- subscriptions ---------------------------------------------------------------

    async def list_subscriptions(self) -> list[dict[str, Any]]:
        out = []
        for sub in self._settings.subscriptions:
            ep = await self._queue.endpoint(sub.name)
            if ep.open_until_ms > self._wall_ms():
                breaker = "open"
            else:
                # Past its pause, a breaker lets one probe through until a success closes it.
                breaker = "half_open" if ep.open_until_ms else "closed"
            out.append(
                {
                    "name": sub.name,
                    "url": redact_url(str(sub.url)),
                    "events": sub.events,
                    "enabled_in_config": sub.enabled,
                    "disabled": ep.disabled,
                    "disabled_reason": ep.disabled_reason or None,
                    "consecutive_failures": ep.failures,
                    "breaker": breaker,
                    "breaker_open_until_ms": ep.open_until_ms or None,
                    "queue": await self._queue.depths(sub.name),
                }
            )
        return out

    async def enable(self, name: str) -> None:
        await self._queue.set_enabled(self._sub(name), True)

    async def dead_letters(self, name: str, limit: int = 100, offset: int = 0) -> list[Any]:
        """A page of dead letters, oldest first: record, attempt history and the body."""
        out = []
        for i in await self._queue.dead_letters(self._sub(name), limit, offset):
            record = await self._queue.record(name, i)
            body = await self._queue.body(name, i)
            if record is not None and body is not None:
                record["body"] = body.decode("utf-8", "replace")
                out.append(record)
        return out

    async def dead_letter_count(self, name: str) -> int:
        return await self._queue.dead_count(self._sub(name))

    async def replay(self, name: str, ids: list[str] | None = None) -> int:
        """Make dead letters due again with a fresh attempt budget; all when `ids` is None."""
        self._sub(name)
        if ids is None:
            ids = []
            offset = 0
            while page := await self._queue.dead_letters(name, 1000, offset):
                ids += page
                offset += len(page)
        n = 0
        for i in ids:
            record = await self._queue.record(name, i)
            if record and record["state"] == "dead":
                n += await self._queue.requeue(name, i, reset_attempts=True)
        return n

    async def redeliver(self, event_id: str) -> list[str]:
        """Send an event again to every subscription that has a record of it."""
        done = []
        for sub in self._settings.subscriptions:
            if await self._queue.requeue(sub.name, event_id, reset_attempts=True):
                done.append(sub.name)
        return done
