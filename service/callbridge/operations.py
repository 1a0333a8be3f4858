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
from callbridge.poll.lifecycle import batch_lifecycle, interval_s
from callbridge.store.leases import LeaseStore
from callbridge.store.queue import DeliveryQueue
from callbridge.store.recovery import RecoveryJobs
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
        jobs: RecoveryJobs | None = None,
        on_recovery_started: Callable[[str], None] = lambda name: None,
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
        self._jobs = jobs
        self._on_recovery_started = on_recovery_started

    def _recovery_jobs(self) -> RecoveryJobs:
        if self._jobs is None:
            raise CallbridgeError("recovery jobs are not available in this process")
        return self._jobs

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
            eid = e["event_id"]
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
                out.append({"subscription": sub.name, **self._linked(record)})
        return out

    def _linked(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` with `trace_url`: its trace in the operator's tracing UI, when
        `tracing.trace_url_template` is set and the event has a trace."""
        template, trace_id = self._settings.tracing.trace_url_template, record["trace_id"]
        record["trace_url"] = (
            template.replace("{trace_id}", trace_id) if template and trace_id else None
        )
        return record

    # -- subscriptions ---------------------------------------------------------------

    async def list_subscriptions(self) -> list[dict[str, Any]]:
        out = []
        for sub in self._settings.subscriptions:
            # On the Redis clock the scripts use (a replica's clock may be skewed).
            ep = await self._queue.endpoint(sub.name)
            out.append(
                {
                    "name": sub.name,
                    "url": redact_url(str(sub.url)),
                    "events": sub.events,
                    "enabled_in_config": sub.enabled,
                    "disabled": ep.disabled,
                    "disabled_reason": ep.disabled_reason or None,
                    "consecutive_failures": ep.failures,
                    "breaker": ep.breaker,
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
                out.append(self._linked(record))
        return out

    async def dead_letter_count(self, name: str) -> int:
        return await self._queue.dead_count(self._sub(name))

    async def replay(self, name: str, ids: list[str]) -> int:
        """Make these dead letters due again with a fresh attempt budget; how many.
        Each is checked and requeued in one script (a letter delivered meanwhile is not
        sent again), and none once the subscription holds its `max_backlog`
        undelivered: the rest stay dead, replayable later."""
        sub = self._settings.subscription(self._sub(name))
        assert sub is not None
        bound = sub.max_backlog or self._settings.delivery.max_backlog
        n = 0
        for i in ids:
            done = await self._queue.requeue(
                name, i, reset_attempts=True, only_dead=True, max_backlog=bound
            )
            if done < 0:
                break
            n += done == 1
        return n

    async def replay_all(self, name: str) -> dict[str, Any]:
        """Start a recovery job of scope ``dead`` over every letter dead now (taken in
        one script, `store.recovery`): the replicas' upkeep makes them due again a page
        at a time, at the pace the endpoint takes them and within `max_backlog`. Each
        call is a new job (until: now), so one asked later picks up newer letters; a
        request sent twice is harmless (a letter no longer dead is skipped)."""
        self._sub(name)
        job, _ = await self._recovery_jobs().start(name, 0, self._wall_ms(), scope="dead")
        self._on_recovery_started(name)
        return job.as_dict()

    async def recover(
        self, name: str, since_ms: int, until_ms: int = 0
    ) -> tuple[dict[str, Any], bool]:
        """Start re-sending what `name` did not get a 2xx for among the events committed
        in [since, until) (`store.recovery`); the job, and whether it is new (the same
        window asked again is the same job)."""
        self._sub(name)
        job, created = await self._recovery_jobs().start(name, since_ms, until_ms)
        # This replica starts on it at once; the others find it within seconds.
        self._on_recovery_started(name)
        return job.as_dict(), created

    async def recovery(self, name: str, job_id: str) -> dict[str, Any] | None:
        self._sub(name)
        job = await self._jobs.get(name, job_id) if self._jobs is not None else None
        return job.as_dict() if job is not None else None

    async def recoveries(self, name: str) -> list[dict[str, Any]]:
        self._sub(name)
        return [j.as_dict() for j in await self._jobs.all(name)] if self._jobs else []

    async def redeliver(self, event_id: str) -> list[str]:
        """Send an event again to every subscription that has a record of it (one
        still due or waiting for its turn is left as it is: on its way already)."""
        done = []
        for sub in self._settings.subscriptions:
            if await self._queue.requeue(sub.name, event_id, reset_attempts=True) > 0:
                done.append(sub.name)
        return done
