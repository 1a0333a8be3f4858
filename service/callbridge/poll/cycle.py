"""Polls batches, turns what changed into events, commits them atomically.

One cycle of one batch (``poll_once``): hold the batch lease, read the pages,
pick the items that differ from the last committed scan, diff them against the
snapshot, commit states + events + timeline in one fenced Lua step, then fan the
events out. A cycle that fails before the commit writes nothing. The owner keeps
the snapshot (encoded), item signatures and page digests in memory, updated only
after a commit and dropped whenever the lease is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence

import msgspec

from callbridge.config import Settings
from callbridge.errors import (
    BatchNotFoundError,
    LeaseLostError,
    UpstreamAuthError,
    UpstreamError,
)
from callbridge.metrics import Metrics
from callbridge.models import PollOutcome, iso_ms
from callbridge.poll.batch_cache import BatchRuntime, Tally
from callbridge.poll.candidates import select_candidates
from callbridge.poll.cycle_metrics import count_odd_items, note_unreadable, record_diff
from callbridge.poll.diff import BatchView, ScanFacts, diff
from callbridge.poll.fanout import EventSink, FanOut
from callbridge.poll.group_commit import GroupCommit
from callbridge.poll.lifecycle import BatchLifecycle, lifecycle
from callbridge.poll.reader import BatchReader, Held, PlannedScan, settle
from callbridge.poll.second_look import (
    MAX_LOOKUPS_PER_CYCLE,
    LookupBudget,
    confirm_backward_moves,
    replays_for,
    restored_suspects,
    stored_suspects,
    suspects_from,
)
from callbridge.poll.upstream import UpstreamClient
from callbridge.poll.upstream_health import PlatformReach
from callbridge.store.leases import LeaseKeeper, LeaseStore
from callbridge.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)


class Poller:
    """Runs poll cycles of batches; holds what this replica knows of each (`BatchRuntime`).

    Which batch is polled when is the `Scheduler`'s business; `poll_once` is the
    whole cycle of one batch.
    """

    def __init__(
        self,
        settings: Settings,
        store: SnapshotStore,
        leases: LeaseStore,
        upstream: UpstreamClient,
        sink: EventSink,
        metrics: Metrics,
        *,
        replica_id: str,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._p = settings.poller
        self._store = store
        self._leases = leases
        self._upstream = upstream
        self._sink = sink
        self._metrics = metrics
        self.replica_id = replica_id
        self._wall_ms = wall_ms
        self._monotonic = monotonic
        self.batches: dict[str, BatchRuntime] = {}
        self.ttl_ms = int(self._p.lease_ttl_seconds * 1000)
        self.reach = PlatformReach(self._p, monotonic=monotonic)
        self._reader = BatchReader(upstream, settings, metrics, monotonic=monotonic)

    # -- state for health and admin ------------------------------------------

    def owned(self) -> list[str]:
        return sorted(b for b, rt in self.batches.items() if rt.token is not None)

    def runtime(self, batch_id: str) -> BatchRuntime | None:
        return self.batches.get(batch_id)

    def lifecycle_of(self, rt: BatchRuntime) -> BatchLifecycle:
        return lifecycle(
            completed=rt.meta.completed,
            last_change_ms=rt.meta.last_change_ms,
            not_found=rt.not_found,
            now_ms=self._wall_ms(),
            settings=self._p,
        )

    async def release(self, rt: BatchRuntime) -> None:
        """Hand a lease back so another replica can take it at once, and drop the cache.

        Best effort: a lease we fail to delete still expires after its TTL.
        """
        if rt.token is not None:
            with contextlib.suppress(Exception):
                await self._leases.release(rt.batch_id, rt.token)
        rt.token = None
        rt.drop_cache()
        # The new owner exports the batch's series; ours would go stale.
        self._metrics.forget_batch(rt.batch_id)

    async def release_all(self) -> None:
        """Hand every held lease back so other replicas take over at once."""
        for rt in self.batches.values():
            await self.release(rt)
        self._metrics.leases_held.set(0)

    # -- one cycle ---------------------------------------------------------------

    async def poll_once(self, batch_id: str, *, backfill: bool | None = None) -> PollOutcome:
        """Poll one batch now: scan, diff, commit, fan out. Safe to call from tests."""
        rt = self.batches.get(batch_id)
        if rt is None:
            rt = BatchRuntime(batch_id, self._p.backfill if backfill is None else backfill)
            self.batches[batch_id] = rt
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
            rt.suspects = restored_suspects(rt.meta.suspects)
            # A previous owner may have committed events it never fanned out.
            rt.outbox_dirty = True
        if rt.outbox_dirty:
            # Before this cycle's events, so a call's older events are queued first.
            await self._sink.drain(batch_id)
            rt.outbox_dirty = False
        assert rt.states is not None
        assert rt.token is not None
        lookups = LookupBudget(MAX_LOOKUPS_PER_CYCLE)
        tally = Tally()
        flusher = rt.group = GroupCommit(
            lambda pages: self._commit(rt, [p.raws for p in pages], lookups, tally)
        )

        async def held(raws: list[bytes]) -> None:
            flusher.changed |= await self._commit(rt, [raws], lookups, tally)

        fanout = rt.fanout = FanOut(self._sink, batch_id)
        try:
            async with LeaseKeeper(self._leases, batch_id, rt.token, self.ttl_ms) as keeper:
                try:
                    scan = await self._scan(rt, keeper, flusher, held)
                    rest = await flusher.finish()
                finally:
                    await flusher.abandon()
                    rt.group = None
                if not isinstance(scan, str):
                    # A full scan's pages went to groups; an active plan's come now.
                    groups = [p.raws for p in rest] if scan.pages is not None else scan.groups
                    changed = await self._commit(rt, groups, lookups, tally, final=scan)
            await fanout.wait()
            rt.outbox_dirty = False  # every event committed in this cycle is queued
        finally:
            await fanout.settle()
            rt.fanout = None
        if isinstance(scan, str):
            return scan
        settle(rt.plan, scan, tally.items, tally.moved, rt.suspects, rt.signatures.owners)
        if scan.partial:
            return "partial"
        return "committed" if changed or flusher.changed else "unchanged"

    async def _commit(
        self,
        rt: BatchRuntime,
        groups: Sequence[Sequence[bytes | msgspec.Raw]],
        lookups: LookupBudget,
        tally: Tally,
        *,
        final: PlannedScan | None = None,
    ) -> bool:
        """Diff the raw items of `groups` against what is committed and commit what
        changed; whether anything did. `final` (the scan) for its last group, which
        commits even when nothing changed (the poll time, batch-level facts, the plan);
        the others commit only changes. `tally` adds up what the planner learns from."""
        batch_id = rt.batch_id
        assert rt.states is not None
        assert rt.token is not None
        cands = select_candidates(groups, rt.signatures)
        if final is None and not cands.items:
            count_odd_items(self._metrics, batch_id, cands.duplicates, cands.invalid)
            return False
        # Decoded once, for the calls that changed: the rest stay encoded.
        previous = {
            c["call_id"]: st for c in cands.items if (st := rt.states.get(c["call_id"])) is not None
        }
        confirmed, moved_on = await confirm_backward_moves(
            self._upstream,
            batch_id,
            previous,
            rt.suspects,
            cands,
            self._p.interval_seconds,
            lookups,
            final.twice if final is not None else (),
        )
        if final is not None:
            confirmed |= final.confirmed  # by the active plan's own reads
        complete = final is not None and final.complete
        tally.items += cands.items
        now_ms = self._wall_ms()
        result = diff(
            batch_id,
            previous,
            cands.items,
            BatchView(rt.meta.counts, rt.meta.completed, rt.meta.completions),
            now_ms=now_ms,
            timestamp=iso_ms(now_ms),
            backfill=rt.backfill,
            scan=ScanFacts(complete=complete, total=final.total if final is not None else None),
            confirmed=confirmed,
            raws=cands.raws,
            replays=replays_for(cands, confirmed, rt.suspects, moved_on),
        )
        note_unreadable(batch_id, rt.states)
        for call_id in result.unconfirmed:
            # Seen again next cycle as a candidate, and confirmed if still backwards.
            cands.signatures.pop(call_id, None)
        suspects = suspects_from(cands, result.unconfirmed, rt.suspects)
        meta = dataclasses.replace(
            rt.meta,
            counts=result.counts,
            completed=result.completed,
            completions=result.completions,
            last_poll_ms=now_ms,
            not_found_since_ms=0,
            suspects=stored_suspects(suspects),
        )
        if final is not None:
            meta.scan_plan, meta.scan_reason = final.plan.kind, final.plan.reason
        tally.moved += len(result.transitions)
        if result.changed:
            meta.last_change_ms = now_ms
        if result.completions > rt.meta.completions:
            meta.completed_at_ms = now_ms
        encoded = {call_id: state.encode() for call_id, state in result.states.items()}
        meta.version, stream_ids = await self._store.commit(
            batch_id,
            token=rt.token,
            expected_version=rt.meta.version,
            lease_ttl_ms=self.ttl_ms,
            states=encoded,
            events=result.events,
            timeline=result.timeline,
            timeline_max=self._p.timeline_max_entries,
            meta=meta,
        )
        # Committed: only now may the caches move forward.
        digests = final.whole_pages if final is not None else None
        rt.committed(meta, result.states, encoded, cands.signatures, suspects, digests)
        record_diff(self._metrics, batch_id, result)
        count_odd_items(self._metrics, batch_id, cands.duplicates, cands.invalid)
        if result.events:
            log.info(
                "batch %s: %d events from %d changed calls%s",
                batch_id,
                len(result.events),
                len(result.states),
                "" if final is not None else " (part of a scan)",
                extra={"action": "cycle_committed", "batch_id": batch_id},
            )
            # Committed, so never lost: a failed fan-out leaves them in the outbox,
            # drained first next cycle. In the background, in order (`FanOut`).
            rt.outbox_dirty = True
            assert rt.fanout is not None
            if stream_ids is None:
                rt.fanout.drain()
            else:
                rt.fanout.publish(list(zip(result.events, stream_ids, strict=True)))
        return result.changed

    async def _scan(
        self, rt: BatchRuntime, keeper: LeaseKeeper, flusher: GroupCommit, on_held: Held
    ) -> PlannedScan | PollOutcome:
        """Read the batch under the planner's plan, or the outcome when nothing came.
        A full scan hands `flusher` each page as it arrives (`BatchReader.read`)."""
        assert rt.states is not None
        try:
            scan = await self._reader.read(
                rt.batch_id,
                keeper,
                rt.plan,
                rt.states,
                rt.meta,
                rt.pages,
                rt.signatures.by_call,
                flusher.add,
                on_held,
            )
        except UpstreamAuthError as exc:
            self.reach.key_rejected(exc)
            return "auth_failed"
        except BatchNotFoundError:
            self.reach.answered()
            return await self._mark_not_found(rt)
        except UpstreamError as exc:
            self.reach.unreachable()
            log.warning(
                "poll of batch %s failed, nothing written: %s",
                rt.batch_id,
                exc,
                extra={"action": "poll_failed", "batch_id": rt.batch_id},
            )
            return "failed"
        self.reach.answered()
        return scan

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
                lease_ttl_ms=self.ttl_ms,
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
            if await self._leases.renew(rt.batch_id, rt.token, self.ttl_ms):
                return True
            log.warning(
                "lease on batch %s expired; reloading it",
                rt.batch_id,
                extra={"action": "lease_lost", "batch_id": rt.batch_id},
            )
            rt.token = None
            rt.drop_cache()
        token = f"{self.replica_id}:{uuid.uuid4().hex[:12]}"
        if await self._leases.acquire(rt.batch_id, token, self.ttl_ms):
            rt.token = token
            rt.drop_cache()
            log.info(
                "took batch %s",
                rt.batch_id,
                extra={"action": "lease_acquired", "batch_id": rt.batch_id},
            )
            return True
        return False

    async def probe(self, batch_id: str) -> None:
        """One small request to learn whether this replica reaches the platform again
        (while it stepped aside it owns no batch, so no cycle would tell it)."""
        try:
            await self._upstream.fetch_page(batch_id, 1, 1)
        except UpstreamAuthError as exc:
            self.reach.key_rejected(exc)
        except UpstreamError:
            pass
        else:
            self.reach.answered()
