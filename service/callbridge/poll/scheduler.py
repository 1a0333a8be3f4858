"""Which batch is polled when, and by which replica.

The scheduler follows the shared batch registry, keeps this replica's share of
the batch leases (``ceil(batches / live replicas)``, surplus handed back so new
replicas get work), and starts a `Poller` cycle for each owned batch when it is
due: active batches every ``interval``, lingering ones slowly, retired ones never.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable

from callbridge.config import Settings
from callbridge.metrics import Metrics
from callbridge.models import PollOutcome
from callbridge.poll.batch_cache import BatchCache
from callbridge.poll.cycle import Poller
from callbridge.poll.fanout import EventSink
from callbridge.poll.lifecycle import interval_s, jittered
from callbridge.poll.planner import expected_requests
from callbridge.store.leases import LeaseStore
from callbridge.store.registry import BatchRegistry
from callbridge.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)

# Order in which due batches start when concurrency or the request budget is short.
_PRIORITY = {"active": 0, "lingering": 1, "not_found": 2}


async def wait_any(*events: asyncio.Event, within_s: float) -> None:
    """Return when any of `events` is set or `within_s` seconds have passed."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Scheduler:
    """Runs the poll loop of this replica."""

    def __init__(
        self,
        settings: Settings,
        poller: Poller,
        store: SnapshotStore,
        leases: LeaseStore,
        registry: BatchRegistry,
        sink: EventSink,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._p = settings.poller
        self._poller = poller
        self._store = store
        self._leases = leases
        self._registry = registry
        self._sink = sink
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._wall_ms = wall_ms
        self._monotonic = monotonic
        self._batches = poller.batches
        self._wake = asyncio.Event()
        self._resync = False
        self._alive = 1
        self._stepped_aside = False
        self.last_loop_at = monotonic()

    def wake(self) -> None:
        """Re-read the registry now (a batch was added or removed)."""
        self._resync = True
        self._wake.set()

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
                    if self._stepped_aside and now >= self._poller.reach.paused_until:
                        await self._probe()
                paused_until = self._poller.reach.paused_until
                if now >= paused_until:
                    self.start_due(now, await self._fair_share(), sem, sync_every)
                wake_at = min(
                    [next_sync, paused_until or math.inf]
                    + [r.next_due for r in self._batches.values() if r.task is None]
                )
                timeout = min(max(0.01, wake_at - self._monotonic()), 1.0)
                self._wake.clear()
                await wait_any(stopping, self._wake, within_s=timeout)
        finally:
            await self._stop_cycles()

    def start_due(
        self, now: float, share: int, sem: asyncio.Semaphore, recheck_s: float
    ) -> list[BatchCache]:
        """Start a cycle of each batch due by `now`, within this replica's `share` of
        the batches and its share of the request budget; those started. A batch of
        another replica's share is looked at again `recheck_s` later."""
        started: list[BatchCache] = []
        # Counted once: nothing here awaits, so it cannot change during the round (a
        # count per batch made a round O(n^2) at thousands of batches). Cycles started
        # for batches we do not hold are not counted: any of them may find its batch
        # taken, and the others must still be tried.
        owned = len(self._poller.owned())
        pages_running = sum(self._pages(r) for r in self._batches.values() if r.task is not None)
        # Active batches first, most overdue first: when the request budget or the
        # concurrency is short, lingering ones wait.
        for rt in sorted(self._batches.values(), key=self._schedule_key):
            if rt.task is not None or rt.retired or rt.next_due > now:
                continue
            if rt.token is None and owned >= share:
                # Another replica's share: look again later, not on every loop turn.
                rt.next_due = now + recheck_s
                continue
            pages = self._pages(rt)
            if pages_running and pages_running + pages > self._page_budget():
                # Scans share the request budget: many at once would all be slow and
                # stale. Fewer at a time each finish quickly.
                break
            pages_running += pages
            rt.task = asyncio.create_task(self.run_cycle(rt, sem))
            started.append(rt)
        return started

    async def run_cycle(self, rt: BatchCache, sem: asyncio.Semaphore) -> None:
        """One scheduled cycle of `rt`: poll, set its next due time, retire it when over."""
        try:
            async with sem:
                now = self._monotonic()
                if rt.last_started is not None:
                    self._metrics.poll_interval.labels(rt.batch_id).set(now - rt.last_started)
                rt.last_started = now
                try:
                    outcome = await self._poller.poll_once(rt.batch_id)
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

    def _pages(self, rt: BatchCache) -> int:
        """Requests the next cycle of `rt` is expected to make, under the plan the
        planner will choose (a full scan: its page count last time)."""
        return expected_requests(
            self._p,
            rt.plan,
            rt.meta.counts,
            self._settings.upstream.page_size,
            self._monotonic(),
            batch_id=rt.batch_id,
            known_pages=len(rt.pages),
        )

    def _page_budget(self) -> float:
        """Pages this replica's running scans may hold: what its share of the fleet's
        request budget reads in one poll interval (so each scan ends within one)."""
        rate = self._settings.upstream.max_requests_per_second / max(1, self._alive)
        return rate * max(1.0, self._p.interval_seconds)

    def _schedule_key(self, rt: BatchCache) -> tuple[int, float]:
        return (_PRIORITY.get(self._poller.lifecycle_of(rt), 3), rt.next_due)

    def _next_interval(self, rt: BatchCache, outcome: PollOutcome) -> float:
        p = self._p
        if outcome == "not_owner":
            return jittered(p.lease_ttl_seconds / 3, p.jitter_ratio, self._rng)
        seconds = interval_s(self._poller.lifecycle_of(rt), p)
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

    async def sync(self) -> None:
        """One sync now (what `run` does every few seconds), for tests and tools."""
        await self._sync(self._monotonic())

    async def _sync(self, now: float) -> None:
        """Heartbeat, renew held leases, follow the registry."""
        try:
            await self._announce()
            await self._registry.prune(int(self._p.retired_retention_seconds * 1000))
            registered = await self._registry.all()
        except Exception:
            log.exception("cannot reach Redis to sync batches", extra={"action": "sync_failed"})
            return
        registered = {b: r for b, r in registered.items() if not r.retired}
        for batch_id, reg in registered.items():
            if batch_id not in self._batches:
                backfill = self._p.backfill if reg.backfill is None else reg.backfill
                self._batches[batch_id] = BatchCache(batch_id, backfill, next_due=now)
                self._metrics.init_batch(batch_id)
        for batch_id in list(self._batches):
            rt = self._batches.get(batch_id)
            if rt is None:
                continue  # retired meanwhile: its cycle's task dropped it during an await
            if batch_id not in registered:
                if rt.task is None:
                    await self._forget(rt)
                continue
            if rt.token is not None and rt.task is None:
                with contextlib.suppress(Exception):
                    if not await self._leases.renew(batch_id, rt.token, self._poller.ttl_ms):
                        rt.token = None
                        rt.drop_cache()
        await self._rebalance()
        self._metrics.leases_held.set(len(self._poller.owned()))

    async def _rebalance(self) -> None:
        """Hand back batches beyond our fair share, so new replicas get work.

        Each replica owns at most ceil(batches / live replicas); the others pick up
        what is released on their next loop. Idle batches go first.
        """
        excess = len(self._poller.owned()) - await self._fair_share()
        if excess <= 0:
            return
        idle = [rt for rt in self._batches.values() if rt.token is not None and rt.task is None]
        for rt in sorted(idle, key=lambda r: r.next_due, reverse=True)[:excess]:
            await self._poller.release(rt)
            log.info(
                "released batch %s to rebalance across replicas",
                rt.batch_id,
                extra={"action": "lease_released", "batch_id": rt.batch_id},
            )

    async def _announce(self) -> None:
        """Heartbeat while this replica can poll; otherwise step aside.

        A replica whose API key is rejected or that cannot reach the platform stops
        counting as alive, so the others size their shares without it and take its
        batches (it releases them); alone, it keeps trying, as nobody else can.
        """
        if self._poller.reach.can_poll:
            self._alive = await self._leases.heartbeat(self._poller.replica_id, self._poller.ttl_ms)
            self._stepped_aside = False
            return
        await self._leases.leave(self._poller.replica_id)
        others = await self._leases.live_replicas(self._poller.ttl_ms)
        self._stepped_aside = others > 0
        self._alive = max(1, others)
        if self._stepped_aside:
            log.warning(
                "cannot poll the platform; handing batches to the %d replicas that can",
                others,
                extra={"action": "stepped_aside"},
            )

    async def _probe(self) -> None:
        batch_id = next((b for b, r in self._batches.items() if not r.retired), None)
        if batch_id is not None:
            with contextlib.suppress(Exception):
                await self._poller.probe(batch_id)

    async def _fair_share(self) -> int:
        """How many batches this replica may own: an even split over live replicas."""
        if self._stepped_aside:
            return 0
        try:
            self._alive = max(1, await self._leases.live_replicas(self._poller.ttl_ms))
        except Exception:
            return len(self._batches)
        active = [r for r in self._batches.values() if not r.retired]
        return max(1, math.ceil(len(active) / self._alive))

    async def leave(self) -> None:
        """Stop counting as alive (graceful shutdown): others rebalance at once."""
        with contextlib.suppress(Exception):
            await self._leases.leave(self._poller.replica_id)

    async def _retire(self, rt: BatchCache) -> None:
        """Nothing polls the batch any more: it should cost nothing from now on.

        Its committed events are fanned out first (they are promises). The registry
        keeps a tombstone (so no replica or restart picks it up again), its state in
        Redis expires after `retired_retention_seconds` (the timeline stays
        inspectable until then), and this replica drops its lease, cache and metric
        series.
        """
        try:
            await self._sink.drain(rt.batch_id)
            await self._registry.retire(rt.batch_id)
            await self._store.expire_batch(
                rt.batch_id, int(self._p.retired_retention_seconds * 1000)
            )
        except Exception:
            # Redis unreachable: the batch stays as it is and retires next time.
            log.exception(
                "could not retire batch %s; will retry",
                rt.batch_id,
                extra={"action": "retire_failed", "batch_id": rt.batch_id},
            )
            rt.retired = False
            return
        await self._poller.release(rt)
        self._batches.pop(rt.batch_id, None)
        self._metrics.forget_batch(rt.batch_id)

    async def _forget(self, rt: BatchCache) -> None:
        """The batch was removed (``DELETE /v1/batches/{id}``): fan out what it had
        committed, let its state expire like a retired batch's, drop it here."""
        try:
            await self._sink.drain(rt.batch_id)
            await self._store.expire_batch(
                rt.batch_id, int(self._p.retired_retention_seconds * 1000)
            )
        except Exception:
            log.exception(
                "could not forget batch %s; will retry",
                rt.batch_id,
                extra={"action": "forget_failed", "batch_id": rt.batch_id},
            )
            return
        self._batches.pop(rt.batch_id, None)
        await self._poller.release(rt)
        self._metrics.forget_batch(rt.batch_id)

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
