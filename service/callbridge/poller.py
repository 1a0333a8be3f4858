"""Polls batches, turns what changed into events, commits them atomically.

One cycle of one batch (``poll_once``): hold the batch lease, read every page,
pick the items that differ from the last committed scan, diff them against the
snapshot, commit states + events + timeline in one fenced Lua step, then fan the
events out to the subscription queues. A cycle that fails anywhere before the
commit writes nothing; the next cycle starts from the same snapshot.

The owner keeps the snapshot, per-call item signatures and per-page body hashes
in memory, so an unchanged page costs one hash and an unchanged call one CRC.
Those caches are updated only after a successful commit and dropped whenever
the lease is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from callbridge.aio import wait_any
from callbridge.config import Settings
from callbridge.diff import BatchView, CallState, DiffResult, diff, select_candidates
from callbridge.errors import (
    BatchNotFoundError,
    LeaseLostError,
    UpstreamAuthError,
    UpstreamError,
)
from callbridge.metrics import Metrics, event_label, status_label
from callbridge.registry import BatchRegistry
from callbridge.relay import Relay
from callbridge.schedule import auth_backoff_s, interval_s, jittered, lifecycle
from callbridge.store import BatchMeta, SnapshotStore
from callbridge.upstream import RawPage, UpstreamClient

log = logging.getLogger(__name__)

PollOutcome = Literal[
    "committed", "unchanged", "not_owner", "failed", "fenced", "not_found", "auth_failed"
]


def iso_ms(now_ms: int) -> str:
    """``2026-11-28T10:00:05.123Z``."""
    dt = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now_ms % 1000:03d}Z"


@dataclass(slots=True)
class BatchRuntime:
    """What this replica knows about a batch it polls."""

    batch_id: str
    backfill: bool
    token: str | None = None
    meta: BatchMeta = field(default_factory=BatchMeta)
    states: dict[str, CallState] | None = None  # None: not loaded (cold)
    signatures: dict[str, int] = field(default_factory=dict)
    pages: dict[int, RawPage] = field(default_factory=dict)
    not_found: bool = False
    retired: bool = False
    # Set while committed events may still sit in the outbox un-fanned-out.
    outbox_dirty: bool = False
    next_due: float = 0.0
    last_started: float | None = None
    task: asyncio.Task[None] | None = None

    def drop_cache(self) -> None:
        self.states = None
        self.signatures = {}
        self.pages = {}


class Poller:
    """Schedules and runs poll cycles for the batches this replica owns."""

    def __init__(
        self,
        settings: Settings,
        store: SnapshotStore,
        registry: BatchRegistry,
        upstream: UpstreamClient,
        relay: Relay,
        metrics: Metrics,
        *,
        replica_id: str,
        rng: random.Random | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._p = settings.poller
        self._store = store
        self._registry = registry
        self._upstream = upstream
        self._relay = relay
        self._metrics = metrics
        self.replica_id = replica_id
        self._rng = rng or random.Random()
        self._wall_ms = wall_ms
        self._monotonic = monotonic
        self._batches: dict[str, BatchRuntime] = {}
        self._ttl_ms = int(self._p.lease_ttl_seconds * 1000)
        self._auth_failures = 0
        self._auth_paused_until = 0.0
        self._wake = asyncio.Event()
        self._resync = False
        self.last_loop_at = monotonic()

    # -- state for health and admin ------------------------------------------

    @property
    def upstream_auth_ok(self) -> bool:
        return self._auth_failures == 0

    def owned(self) -> list[str]:
        return sorted(b for b, rt in self._batches.items() if rt.token is not None)

    def runtime(self, batch_id: str) -> BatchRuntime | None:
        return self._batches.get(batch_id)

    def lifecycle_of(self, meta: BatchMeta, not_found: bool = False) -> str:
        return lifecycle(
            completed=meta.completed,
            last_change_ms=meta.last_change_ms,
            not_found=not_found,
            now_ms=self._wall_ms(),
            settings=self._p,
        )

    def wake(self) -> None:
        """Re-read the registry now (a batch was added or removed)."""
        self._resync = True
        self._wake.set()

    # -- one cycle ---------------------------------------------------------------

    async def poll_once(self, batch_id: str, *, backfill: bool | None = None) -> PollOutcome:
        """Poll one batch now: scan, diff, commit, fan out. Safe to call from tests."""
        rt = self._batches.get(batch_id)
        if rt is None:
            rt = BatchRuntime(batch_id, self._p.backfill if backfill is None else backfill)
            self._batches[batch_id] = rt
        started = time.perf_counter()
        try:
            outcome = await self._cycle(rt)
        except LeaseLostError as exc:
            log.warning("%s", exc, extra={"action": "lease_lost", "batch_id": batch_id})
            rt.token = None
            rt.drop_cache()
            outcome = "fenced"
        self._metrics.poll_cycles.labels(batch_id, outcome).inc()
        self._metrics.poll_cycle_duration.observe(time.perf_counter() - started)
        self._metrics.leases_held.set(len(self.owned()))
        return outcome

    async def _cycle(self, rt: BatchRuntime) -> PollOutcome:
        batch_id = rt.batch_id
        if not await self._ensure_lease(rt):
            return "not_owner"
        if rt.states is None:
            rt.meta, rt.states = await self._store.load(batch_id)
            rt.not_found = rt.meta.not_found_since_ms > 0
            # A previous owner may have committed events it never fanned out.
            await self._relay.drain(batch_id)
        assert rt.states is not None
        pages: list[RawPage] = []
        try:
            async for page in self._upstream.iter_pages(batch_id, rt.pages):
                pages.append(page)
        except UpstreamAuthError as exc:
            self._on_auth_failure(exc)
            return "auth_failed"
        except BatchNotFoundError:
            self._on_auth_success()
            return await self._mark_not_found(rt)
        except UpstreamError as exc:
            log.warning(
                "poll of batch %s failed, nothing written: %s",
                batch_id,
                exc,
                extra={"action": "poll_failed", "batch_id": batch_id},
            )
            return "failed"
        self._on_auth_success()

        candidates, new_sigs, duplicates = select_candidates(
            (p.items for p in pages), rt.signatures
        )
        now_ms = self._wall_ms()
        result = diff(
            batch_id,
            rt.states,
            candidates,
            BatchView(rt.meta.counts, rt.meta.completed, rt.meta.completions),
            now_ms=now_ms,
            timestamp=iso_ms(now_ms),
            backfill=rt.backfill,
        )
        if duplicates:
            result.anomalies["duplicate_item"] += duplicates
        meta = dataclasses.replace(
            rt.meta,
            counts=result.counts,
            completed=result.completed,
            completions=result.completions,
            last_poll_ms=now_ms,
            not_found_since_ms=0,
        )
        if result.changed:
            meta.last_change_ms = now_ms
        if result.completions > rt.meta.completions:
            meta.completed_at_ms = now_ms
        assert rt.token is not None
        meta.version, stream_ids = await self._store.commit(
            batch_id,
            token=rt.token,
            expected_version=rt.meta.version,
            lease_ttl_ms=self._ttl_ms,
            states=result.states,
            events=result.events,
            timeline=result.timeline,
            timeline_max=self._p.timeline_max_entries,
            meta=meta,
        )
        # Committed: only now may the caches move forward.
        rt.meta = meta
        rt.not_found = False
        rt.states.update(result.states)
        rt.signatures.update(new_sigs)
        rt.pages = {p.page: dataclasses.replace(p, items=[], unchanged=False) for p in pages}
        self._record(batch_id, result)
        if result.events:
            log.info(
                "batch %s: %d events from %d changed calls",
                batch_id,
                len(result.events),
                len(result.states),
                extra={"action": "cycle_committed", "batch_id": batch_id},
            )
        if rt.outbox_dirty:
            # A fan-out failed earlier: what it left in the outbox goes first.
            await self._relay.drain(batch_id)
            rt.outbox_dirty = False
        if result.events:
            # Committed, so never lost: if this fails the outbox still holds them.
            rt.outbox_dirty = True
            await self._relay.publish(batch_id, list(zip(result.events, stream_ids, strict=True)))
            rt.outbox_dirty = False
        return "committed" if result.changed else "unchanged"

    def _record(self, batch_id: str, result: DiffResult) -> None:
        m = self._metrics
        m.set_calls(batch_id, result.counts)
        for frm, to in result.transitions:
            m.transitions.labels(status_label(frm), status_label(to)).inc()
        for ev in result.events:
            m.events.labels(event_label(ev.type)).inc()
        for kind, n in result.anomalies.items():
            m.upstream_anomalies.labels(kind).inc(n)
            log.warning(
                "batch %s: %d odd item(s) in the scan: %s",
                batch_id,
                n,
                kind,
                extra={"action": "upstream_anomaly", "batch_id": batch_id},
            )

    async def _mark_not_found(self, rt: BatchRuntime) -> PollOutcome:
        if not rt.not_found:
            log.warning(
                "batch %s not found upstream; rechecking every %.0fs",
                rt.batch_id,
                self._p.not_found_recheck_seconds,
                extra={"action": "batch_not_found", "batch_id": rt.batch_id},
            )
            meta = dataclasses.replace(rt.meta, not_found_since_ms=self._wall_ms())
            assert rt.token is not None
            meta.version, _ = await self._store.commit(
                rt.batch_id,
                token=rt.token,
                expected_version=rt.meta.version,
                lease_ttl_ms=self._ttl_ms,
                states={},
                events=[],
                timeline=[],
                timeline_max=self._p.timeline_max_entries,
                meta=meta,
            )
            rt.meta = meta
        rt.not_found = True
        return "not_found"

    async def _ensure_lease(self, rt: BatchRuntime) -> bool:
        if rt.token is not None:
            if await self._store.renew_lease(rt.batch_id, rt.token, self._ttl_ms):
                return True
            log.warning(
                "lease on batch %s expired; reloading it",
                rt.batch_id,
                extra={"action": "lease_lost", "batch_id": rt.batch_id},
            )
            rt.token = None
            rt.drop_cache()
        token = f"{self.replica_id}:{uuid.uuid4().hex[:12]}"
        if await self._store.acquire_lease(rt.batch_id, token, self._ttl_ms):
            rt.token = token
            rt.drop_cache()
            log.info(
                "took batch %s",
                rt.batch_id,
                extra={"action": "lease_acquired", "batch_id": rt.batch_id},
            )
            return True
        return False

    def _on_auth_failure(self, exc: UpstreamAuthError) -> None:
        self._auth_failures += 1
        pause = auth_backoff_s(self._auth_failures, self._p)
        self._auth_paused_until = self._monotonic() + pause
        log.error(
            "upstream rejected the API key; all polling paused for %.0fs: %s",
            pause,
            exc,
            extra={"action": "upstream_auth_failed"},
        )

    def _on_auth_success(self) -> None:
        if self._auth_failures:
            log.info("upstream accepts the API key again", extra={"action": "upstream_auth_ok"})
        self._auth_failures = 0
        self._auth_paused_until = 0.0

    # -- the loop ------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Poll due batches until `stopping` is set, then finish running cycles."""
        sem = asyncio.Semaphore(self._p.max_concurrent_batches)
        next_sync = 0.0
        sync_every = max(1.0, self._p.lease_ttl_seconds / 3)
        try:
            while not stopping.is_set():
                now = self._monotonic()
                self.last_loop_at = now
                if now >= next_sync or self._resync:
                    self._resync = False
                    await self._sync(now)
                    next_sync = now + sync_every
                if now >= self._auth_paused_until:
                    share = await self._fair_share()
                    # Active batches first: when the request budget or the
                    # concurrency is short, lingering and missing ones wait.
                    for rt in sorted(self._batches.values(), key=self._schedule_key):
                        if rt.task is not None or rt.retired or rt.next_due > now:
                            continue
                        if rt.token is None and len(self.owned()) >= share:
                            # Another replica's share: look again at the next sync,
                            # not on every loop turn.
                            rt.next_due = now + sync_every
                            continue
                        rt.task = asyncio.create_task(self._run_cycle(rt, sem))
                wake_at = min(
                    [next_sync, self._auth_paused_until or math.inf]
                    + [r.next_due for r in self._batches.values() if r.task is None]
                )
                timeout = min(max(0.01, wake_at - self._monotonic()), 1.0)
                self._wake.clear()
                await wait_any(stopping, self._wake, within_s=timeout)
        finally:
            await self._stop_cycles()

    async def _run_cycle(self, rt: BatchRuntime, sem: asyncio.Semaphore) -> None:
        try:
            async with sem:
                now = self._monotonic()
                if rt.last_started is not None:
                    self._metrics.poll_interval.labels(rt.batch_id).set(now - rt.last_started)
                rt.last_started = now
                try:
                    outcome = await self.poll_once(rt.batch_id)
                except Exception:
                    # Redis down, a bug: log it and keep every other batch going.
                    log.exception(
                        "poll cycle of batch %s crashed",
                        rt.batch_id,
                        extra={"action": "poll_crashed", "batch_id": rt.batch_id},
                    )
                    outcome = "failed"
                # Timed from the cycle's start, so the period is the interval and
                # not the interval plus however long the scan took.
                rt.next_due = max(self._monotonic(), now + self._next_interval(rt, outcome))
                if rt.retired:
                    await self._retire(rt)
        finally:
            rt.task = None

    def _schedule_key(self, rt: BatchRuntime) -> tuple[int, float]:
        state = self.lifecycle_of(rt.meta, rt.not_found)
        return (_PRIORITY.get(state, 3), rt.next_due)

    def _next_interval(self, rt: BatchRuntime, outcome: PollOutcome) -> float:
        p = self._p
        if outcome == "not_owner":
            return jittered(p.lease_ttl_seconds / 3, p.jitter_ratio, self._rng)
        state = lifecycle(
            completed=rt.meta.completed,
            last_change_ms=rt.meta.last_change_ms,
            not_found=rt.not_found,
            now_ms=self._wall_ms(),
            settings=p,
        )
        seconds = interval_s(state, p)
        if seconds is None:
            log.info(
                "batch %s retired after lingering %.0fs without change",
                rt.batch_id,
                p.linger_seconds,
                extra={"action": "batch_retired", "batch_id": rt.batch_id},
            )
            rt.retired = True
            return math.inf
        return jittered(seconds, p.jitter_ratio, self._rng)

    async def _sync(self, now: float) -> None:
        """Heartbeat, renew held leases, follow the registry."""
        try:
            await self._store.heartbeat(self.replica_id, self._wall_ms(), self._ttl_ms)
            registered = await self._registry.all()
        except Exception:
            log.exception("cannot reach Redis to sync batches", extra={"action": "sync_failed"})
            return
        registered = {b: r for b, r in registered.items() if not r.retired}
        for batch_id, reg in registered.items():
            if batch_id not in self._batches:
                backfill = self._p.backfill if reg.backfill is None else reg.backfill
                self._batches[batch_id] = BatchRuntime(batch_id, backfill, next_due=now)
        for batch_id in list(self._batches):
            rt = self._batches[batch_id]
            if batch_id not in registered:
                if rt.task is None:
                    await self._forget(rt)
                continue
            if rt.token is not None and rt.task is None:
                with contextlib.suppress(Exception):
                    if not await self._store.renew_lease(batch_id, rt.token, self._ttl_ms):
                        rt.token = None
                        rt.drop_cache()
        await self._rebalance()
        self._metrics.leases_held.set(len(self.owned()))

    async def _rebalance(self) -> None:
        """Hand back batches beyond our fair share, so new replicas get work.

        Each replica owns at most ceil(batches / live replicas); the others pick up
        what is released on their next loop. Idle batches go first.
        """
        excess = len(self.owned()) - await self._fair_share()
        if excess <= 0:
            return
        idle = [rt for rt in self._batches.values() if rt.token is not None and rt.task is None]
        for rt in sorted(idle, key=lambda r: r.next_due, reverse=True)[:excess]:
            await self._release(rt)
            log.info(
                "released batch %s to rebalance across replicas",
                rt.batch_id,
                extra={"action": "lease_released", "batch_id": rt.batch_id},
            )

    async def _fair_share(self) -> int:
        """How many batches this replica may own: an even split over live replicas."""
        try:
            alive = await self._store.live_replicas(self._wall_ms(), self._ttl_ms)
        except Exception:
            return len(self._batches)
        active = [r for r in self._batches.values() if not r.retired]
        return max(1, math.ceil(len(active) / max(1, alive)))

    async def _retire(self, rt: BatchRuntime) -> None:
        """Nothing polls the batch any more: it should cost nothing from now on.

        The registry keeps a tombstone (so no replica or restart picks it up again),
        its state in Redis expires after `retired_retention_seconds` (the timeline
        stays inspectable until then), and this replica drops its lease, cache and
        metric series.
        """
        with contextlib.suppress(Exception):
            await self._registry.retire(rt.batch_id)
            await self._store.expire_batch(
                rt.batch_id, int(self._p.retired_retention_seconds * 1000)
            )
        await self._release(rt)
        self._batches.pop(rt.batch_id, None)
        self._metrics.forget_batch(rt.batch_id)

    async def _forget(self, rt: BatchRuntime) -> None:
        self._batches.pop(rt.batch_id, None)
        await self._release(rt)

    async def _release(self, rt: BatchRuntime) -> None:
        """Hand a lease back so another replica can take it at once, and drop the cache.

        Best effort: a lease we fail to delete still expires after its TTL.
        """
        if rt.token is not None:
            with contextlib.suppress(Exception):
                await self._store.release_lease(rt.batch_id, rt.token)
        rt.token = None
        rt.drop_cache()

    async def _stop_cycles(self) -> None:
        tasks = [rt.task for rt in self._batches.values() if rt.task is not None]
        if tasks:
            # A cycle either commits as a whole or not at all; let running ones end.
            _, pending = await asyncio.wait(
                tasks, timeout=self._settings.server.shutdown_grace_seconds
            )
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def release_all(self) -> None:
        """Hand every held lease back so other replicas take over at once."""
        for rt in self._batches.values():
            await self._release(rt)
        self._metrics.leases_held.set(0)


_PRIORITY = {"active": 0, "lingering": 1, "not_found": 2}
