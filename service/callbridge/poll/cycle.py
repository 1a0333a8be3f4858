"""Polls batches, turns what changed into events, commits them atomically.

One cycle of one batch (``poll_once``): hold the batch lease, read the pages,
pick the items that differ from the last committed scan, diff them against the
snapshot, commit states + events + timeline in one fenced Lua step, then fan the
events out. A cycle that fails before the commit writes nothing. The owner keeps
the snapshot (encoded), item signatures and page digests in memory, updated only
after a commit and dropped whenever the lease is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence

import msgspec

from callbridge.config import Settings
from callbridge.errors import (
    BatchNotFoundError,
    LeaseLostError,
    RateLimitedError,
    UpstreamAuthError,
    UpstreamError,
)
from callbridge.metrics import Metrics
from callbridge.models import Event, PollOutcome, TimelineEntry, iso_ms
from callbridge.poll.batch_cache import BatchCache, CycleCommits, meta_after
from callbridge.poll.batch_end import (
    after_census,
    needs_census,
    not_found_step,
    unknown_statuses_final,
)
from callbridge.poll.candidates import select_candidates
from callbridge.poll.cycle_metrics import count_odd_items, note_unreadable, record_diff
from callbridge.poll.cycle_trace import CycleTracer
from callbridge.poll.diff import BatchView, ScanFacts, diff
from callbridge.poll.fanout import EventSink, FanOut, drained
from callbridge.poll.group_commit import GroupCommit
from callbridge.poll.lifecycle import BatchLifecycle, batch_lifecycle
from callbridge.poll.ownership import Ownership
from callbridge.poll.reader import BatchReader, CycleRead, NothingRead, OnHeld, settle_plan
from callbridge.poll.second_look import (
    MAX_LOOKUPS_PER_CYCLE,
    LookupBudget,
    confirm_backward_moves,
    must_judge,
    replays_for,
    restored_suspects,
    stored_suspects,
    suspects_from,
    unsettled,
)
from callbridge.poll.upstream import UpstreamClient
from callbridge.poll.upstream_health import UpstreamHealth
from callbridge.store.leases import LeaseKeeper, LeaseStore
from callbridge.store.snapshots import BatchMeta, SnapshotStore
from callbridge.tracing import Tracing

log = logging.getLogger(__name__)


class Poller:
    """Runs poll cycles of batches; holds what this replica knows of each (`BatchCache`).

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
        tracing: Tracing | None = None,
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
        self.batches: dict[str, BatchCache] = {}
        self.ttl_ms = int(self._p.lease_ttl_seconds * 1000)
        self.ownership = Ownership(leases, metrics, replica_id=replica_id, ttl_ms=self.ttl_ms)
        self.reach = UpstreamHealth(self._p, monotonic=monotonic)
        self._trace = trace = CycleTracer(tracing or Tracing.off())
        self._reader = BatchReader(upstream, settings, metrics, monotonic=monotonic, trace=trace)

    # -- state for health and admin ------------------------------------------

    def owned(self) -> list[str]:
        return sorted(b for b, rt in self.batches.items() if rt.token is not None)

    def owns(self, batch_id: str) -> bool:
        rt = self.batches.get(batch_id)
        return rt is not None and rt.token is not None

    def runtime(self, batch_id: str) -> BatchCache | None:
        return self.batches.get(batch_id)

    def lifecycle_of(self, rt: BatchCache) -> BatchLifecycle:
        return batch_lifecycle(rt.meta, self._wall_ms(), self._p, not_found=rt.not_found)

    async def release(self, rt: BatchCache) -> None:
        """Hand a lease back so another replica can take it at once (`Ownership`)."""
        await self.ownership.release(rt)

    async def release_all(self) -> None:
        """Hand every held lease back so other replicas take over at once."""
        for rt in self.batches.values():
            await self.release(rt)
        self._metrics.leases_held.set(0)

    # -- one cycle ---------------------------------------------------------------

    async def poll_once(self, batch_id: str, *, backfill: bool | None = None) -> PollOutcome:
        """Poll one batch now: scan, diff, commit, fan out. Safe to call from tests.

        One cycle of a batch at a time on this replica: a second call waits for the
        running one instead of racing it over the same cache and lease."""
        rt = self.batches.get(batch_id)
        if rt is None:
            rt = BatchCache(batch_id, self._p.backfill if backfill is None else backfill)
            self.batches[batch_id] = rt
        async with rt.cycle_lock:
            return await self._trace.cycle(rt, self._timed_cycle)  # in its span (tracing on)

    async def _timed_cycle(self, rt: BatchCache) -> PollOutcome:
        batch_id, started = rt.batch_id, time.perf_counter()
        try:
            outcome = await self._cycle(rt)
        except LeaseLostError as exc:
            log.warning("%s", exc, extra={"action": "lease_lost", "batch_id": batch_id})
            rt.token = None
            rt.drop_cache()
            outcome = "fenced"
        self._metrics.poll_cycles.labels(batch_id, outcome).inc()
        self._metrics.poll_cycle_duration.observe(time.perf_counter() - started)
        return outcome

    async def _cycle(self, rt: BatchCache) -> PollOutcome:
        """One cycle, step by step: lease -> load -> plan + read (groups of pages
        committed as they arrive) -> the final commit -> fan out -> settle the plan."""
        if not await self.ownership.hold(rt):
            return "not_owner"
        await self._load(rt)
        rt.cycle += 1
        assert rt.token is not None
        lookups = LookupBudget(MAX_LOOKUPS_PER_CYCLE)
        commits = CycleCommits(served=set() if rt.census else None)
        groups = rt.group = GroupCommit(
            lambda pages: self._commit(rt, [p.raws for p in pages], lookups, commits)
        )

        async def commit_held(raws: list[bytes], twice: set[str]) -> None:
            groups.changed |= await self._commit(rt, [raws], lookups, commits, twice=twice)

        fanout = rt.fanout = FanOut(self._sink, rt.batch_id)
        try:
            async with LeaseKeeper(self._leases, rt.batch_id, rt.token, self.ttl_ms) as keeper:
                try:
                    read = await self._read(rt, keeper, groups, commit_held)
                    rest = await groups.finish()
                finally:
                    await groups.abandon()
                    rt.group = None
                if isinstance(read, CycleRead):
                    # A full read's pages went to groups; an active plan's come now.
                    last = [p.raws for p in rest] if read.pages is not None else read.groups
                    changed = await self._commit(rt, last, lookups, commits, final=read)
            # A failed fan-out (logged) leaves its events in the outbox: the cycle still
            # settles its plan, its commits stand. One that committed nothing leaves the
            # outbox as its load's drain did (held by min_replicas_to_ack: still to drain).
            if await fanout.succeeded() and fanout.ran:
                rt.outbox_dirty = False  # every event committed in this cycle is queued
        finally:
            await fanout.settle()
            rt.fanout = None
        if isinstance(read, NothingRead):
            return read.outcome
        settle_plan(rt.plan, read, commits.items, commits.moved, rt.suspects, rt.signatures.owners)
        if read.partial:
            return "partial"
        return "committed" if changed or groups.changed else "unchanged"

    async def _load(self, rt: BatchCache) -> None:
        """The batch's snapshot, once per lease; then what a previous owner (or a
        failed fan-out) left in the outbox, before this cycle's events, so a call's
        older events are queued first."""
        if rt.states is None:
            rt.meta, rt.states = await self._store.load(rt.batch_id)
            rt.not_found = rt.meta.not_found_since_ms > 0
            rt.suspects = restored_suspects(rt.meta.suspects, rt.meta.suspects_twice)
            # A previous owner may have committed events it never fanned out.
            rt.outbox_dirty = True
        if rt.outbox_dirty:
            rt.outbox_dirty = not await drained(self._sink, rt.batch_id)

    async def _commit(
        self,
        rt: BatchCache,
        groups: Sequence[Sequence[bytes | msgspec.Raw]],
        lookups: LookupBudget,
        commits: CycleCommits,
        *,
        final: CycleRead | None = None,
        twice: Collection[str] = (),
    ) -> bool:
        """Diff the raw items of `groups` against what is committed and commit what
        changed; whether anything did. `final` (the read) for its last group, which
        commits even when nothing changed (the poll time, batch-level facts, the plan);
        the others commit only changes. `commits` adds up what the planner learns from;
        `twice`: calls the reads served twice (an active plan's, before a fall-back)."""
        batch_id = rt.batch_id
        assert rt.states is not None
        assert rt.token is not None
        cands = select_candidates(groups, rt.signatures, must_judge(rt.suspects, rt.cycle))
        # Calls the reads served twice: a backward one is confirmed (`second_look`).
        cands.twice.update(final.twice if final is not None else twice)
        if commits.served is not None:
            commits.served.update(c["call_id"] for c in cands.items)
            commits.served |= cands.unchanged
        if final is None and not cands.items:
            count_odd_items(self._metrics, batch_id, cands.duplicates, cands.invalid)
            return False
        # Decoded once, for the calls that changed: the rest stay encoded.
        previous = {
            c["call_id"]: st for c in cands.items if (st := rt.states.get(c["call_id"])) is not None
        }
        # Second looks at calls seen going back, and what the active plan's reads confirmed.
        confirmed, moved_on = await confirm_backward_moves(
            self._upstream,
            batch_id,
            previous,
            rt.suspects,
            cands,
            self._p.interval_seconds,
            lookups,
            rt.cycle,
        )
        if final is not None:
            confirmed |= final.confirmed
        commits.items += cands.items
        now_ms = self._wall_ms()
        # A census (`batch_end`) names the calls no page served: gone for long, removed.
        census = commits.served if final is not None and final.whole_pages is not None else None
        vanished, removed = after_census(rt.states, census, rt.meta.vanished, now_ms, self._p)
        previous.update((c, st) for c in removed if (st := rt.states.get(c)) is not None)
        unknown_final = unknown_statuses_final(rt.meta, now_ms, self._p)
        result = diff(
            batch_id,
            previous,
            cands.items,
            BatchView(rt.meta.counts, rt.meta.completed, rt.meta.completions, unknown_final),
            now_ms=now_ms,
            timestamp=iso_ms(now_ms),
            backfill=rt.backfill,
            scan=ScanFacts(
                complete=final is not None and final.complete,
                total=final.total if final is not None else None,
                unsettled=unsettled(rt.suspects, cands) if final is not None else 0,
            ),
            confirmed=confirmed,
            raws=cands.raws,
            replays=replays_for(cands, confirmed, rt.suspects, moved_on),
            removed=removed,
        )
        note_unreadable(batch_id, rt.states)
        for call_id in result.unconfirmed:
            # Seen again next cycle as a candidate, and confirmed if still backwards.
            cands.signatures.pop(call_id, None)
        suspects = suspects_from(cands, result.unconfirmed, rt.suspects, rt.cycle)
        meta = meta_after(
            rt.meta, result, stored_suspects(suspects), final.plan if final else None, now_ms
        )
        meta.vanished = vanished
        commits.moved += len(result.transitions)
        encoded = {call_id: state.encode() for call_id, state in result.states.items()}
        events, stream_ids = await self._write(
            rt, encoded, result.events, result.timeline, meta, final is not None
        )
        # Committed: only now may the caches move forward.
        digests = final.whole_pages if final is not None else None
        rt.committed(meta, result.states, encoded, cands.signatures, suspects, digests)
        if final is not None and final.whole_pages is not None:
            rt.census = needs_census(len(rt.states), meta.counts, final.total)
        record_diff(self._metrics, batch_id, result)
        count_odd_items(self._metrics, batch_id, cands.duplicates, cands.invalid)
        if events:
            self._hand_on(rt, events, stream_ids, len(result.states), final is not None)
        return result.changed

    async def _write(
        self, rt: BatchCache, states: dict[str, str], found: list[Event],
        timeline: list[TimelineEntry], meta: BatchMeta, final: bool,
    ) -> tuple[list[Event], list[bytes] | None]:  # fmt: skip
        """One fenced commit, in its span (tracing on): `meta.version` moves on; the
        events as committed (with their trace contexts) and their outbox ids."""
        assert rt.token is not None
        with self._trace.commit(rt, found, final=final) as events:
            meta.version, stream_ids = await self._store.commit(
                rt.batch_id,
                token=rt.token,
                expected_version=rt.meta.version,
                lease_ttl_ms=self.ttl_ms,
                states=states,
                events=events,
                timeline=timeline,
                timeline_max=self._p.timeline_max_entries,
                meta=meta,
            )
        return events, stream_ids

    def _hand_on(
        self, rt: BatchCache, events: list[Event], stream_ids: list[bytes] | None, calls: int,
        last_group: bool,
    ) -> None:  # fmt: skip
        """Fan committed events out, in the background, after those committed before."""
        log.info(
            "batch %s: %d events from %d changed calls%s", rt.batch_id, len(events), calls,
            "" if last_group else " (part of a scan)",
            extra={"action": "cycle_committed", "batch_id": rt.batch_id},
        )  # fmt: skip
        # Committed, so never lost: a failed fan-out leaves them in the outbox,
        # drained first next cycle. In the background, in order (`FanOut`).
        rt.outbox_dirty = True
        assert rt.fanout is not None
        if stream_ids is None:
            rt.fanout.drain()
        else:
            rt.fanout.publish(list(zip(events, stream_ids, strict=True)))

    async def _read(
        self, rt: BatchCache, keeper: LeaseKeeper, groups: GroupCommit, on_held: OnHeld
    ) -> CycleRead | NothingRead:
        """Read the batch under the planner's plan, or how the cycle ends when nothing
        came. A full read hands `groups` each page as it arrives (`BatchReader.read`)."""
        assert rt.states is not None
        try:
            read = await self._reader.read(
                rt.batch_id,
                keeper,
                rt.plan,
                rt.states,
                rt.meta,
                {} if rt.census else rt.pages,  # a census reads every page
                rt.signatures.by_call,
                groups.add,
                on_held,
            )
        except UpstreamAuthError as exc:
            self.reach.key_rejected(exc)
            return NothingRead("auth_failed")
        except BatchNotFoundError:
            self.reach.answered()
            return NothingRead(await self._mark_not_found(rt))
        except UpstreamError as exc:
            if isinstance(exc, RateLimitedError):
                self.reach.rate_limited()
            else:
                self.reach.unreachable()
            log.warning(
                "poll of batch %s failed, nothing written: %s",
                rt.batch_id,
                exc,
                extra={"action": "poll_failed", "batch_id": rt.batch_id},
            )
            return NothingRead("failed")
        self.reach.answered()
        return read

    async def _mark_not_found(self, rt: BatchCache) -> PollOutcome:
        """Note that the batch answered 404, and retire it once it has for long
        enough (`batch_end.not_found_step`)."""
        meta, found = not_found_step(rt.batch_id, rt.meta, self._wall_ms(), self._p)
        if meta is not None:
            events, stream_ids = await self._write(rt, {}, found, [], meta, True)
            rt.meta = meta
            if events:
                self._hand_on(rt, events, stream_ids, 0, last_group=True)
        rt.not_found = True
        return "not_found"

    async def probe(self, batch_id: str) -> None:
        """Whether this replica reaches the platform again (`UpstreamHealth.probe`)."""
        await self.reach.probe(self._upstream, batch_id)
