"""Reading a batch for one cycle under the plan the `planner` picks.

`BatchReader.read` reads every page (`full_read.read_pages`) or runs the active plan
(`active_read`), falling back to every page in the same cycle when the active plan
cannot stand for a full scan. Either way the cycle gets raw item bytes, in the
order they were served, for the same `select_candidates` -> diff -> commit path:
the planner decides which requests to make, never what they mean. `settle_plan` moves
the planner's memory on once the cycle is committed.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec

from callbridge.config import Settings
from callbridge.errors import FullReadNeeded, UpstreamAuthError, UpstreamError
from callbridge.metrics import Metrics
from callbridge.models import PollOutcome
from callbridge.poll.active_read import ActiveRead
from callbridge.poll.cycle_trace import CycleTracer
from callbridge.poll.full_read import read_pages
from callbridge.poll.pages import RawPage
from callbridge.poll.planner import (
    FILTER_DISTRUST_S,
    Plan,
    PlanReason,
    PlanState,
    choose,
    full_cost,
    learn,
)
from callbridge.poll.second_look import Suspect
from callbridge.poll.upstream import UpstreamClient
from callbridge.store.callstate import CallStates
from callbridge.store.leases import LeaseKeeper
from callbridge.store.snapshots import BatchMeta
from callbridge.tracing import Tracing

log = logging.getLogger(__name__)

# Commits what an active plan's reads hold (`ActiveRead.held`: their raw items, and the
# calls of those the reads served twice), before its cycle falls back.
OnHeld = Callable[[list[bytes], set[str]], Awaitable[object]]


@dataclass(slots=True)
class CycleRead:
    """What one cycle read under its plan, ready for `select_candidates` and the diff."""

    plan: Plan
    # Raw items in the order they were served (a later copy of a call wins).
    groups: list[Sequence[bytes | msgspec.Raw]]
    # Every call of the batch was read: batch-level facts (completion) may follow.
    complete: bool
    total: int | None
    # A request failed after its retries; what arrived before is kept.
    partial: bool
    # The full scan's pages (for the page digests); None when the plan was active.
    pages: list[RawPage] | None
    # When the plan was chosen (monotonic) and what a full scan would cost.
    started: float
    full_pages: int
    page_size: int
    requests: Counter[str] = field(default_factory=Counter)
    resolve_requests: int = 0
    anomaly: str | None = None
    # The anomaly made the planner distrust the status filter (`PlanState.misbehaved`).
    distrust: bool = False
    # The planner's `gone` set once this cycle is committed.
    gone: set[str] = field(default_factory=set)
    # Backward moves the reads themselves confirmed (`ActiveRead.confirmed`).
    confirmed: set[str] = field(default_factory=set)
    # Calls whose new status the reads served twice (`ActiveRead.served_twice`).
    twice: set[str] = field(default_factory=set)

    @property
    def whole_pages(self) -> list[RawPage] | None:
        """Every page of the batch, when a full scan read them all (their digests let
        the next full scan skip pages that did not change); else None."""
        return self.pages if self.complete else None


@dataclass(frozen=True, slots=True)
class NothingRead:
    """A cycle that got nothing usable from the platform, and how it ends."""

    outcome: PollOutcome


class BatchReader:
    """Reads a batch for one cycle under the plan `planner.choose` picks."""

    def __init__(
        self,
        upstream: UpstreamClient,
        settings: Settings,
        metrics: Metrics,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        trace: CycleTracer | None = None,
    ) -> None:
        self._upstream = upstream
        self._trace = trace or CycleTracer(Tracing.off())
        self._p = settings.poller
        self._page_size = settings.upstream.page_size
        self._metrics = metrics
        self._monotonic = monotonic

    async def read(
        self,
        batch_id: str,
        keeper: LeaseKeeper,
        state: PlanState,
        states: CallStates,
        meta: BatchMeta,
        previous_pages: Mapping[int, RawPage],
        known: Mapping[str, int],
        on_page: Callable[[RawPage], None] | None = None,
        on_held: OnHeld | None = None,
    ) -> CycleRead:
        """Read `batch_id` for one cycle (`state`: the planner's memory of it, `states`
        and `meta`: its snapshot, `known`: item signatures as last committed); an
        active plan that cannot stand for a full scan falls back to one in the same
        cycle. The cycle's requests and plan are counted. A full scan hands each page
        to `on_page` as it arrives (the group commit). Before falling back, what the
        active reads served twice, and what they saw going back (`ActiveRead.held`),
        goes to `on_held`, to commit at once.

        Raises the upstream error when nothing at all could be read.
        """
        scan = await self._read(
            batch_id, keeper, state, states, meta, previous_pages, known, on_page, on_held
        )
        record(self._metrics, batch_id, scan)
        self._trace.read(
            scan.plan.kind, scan.plan.reason, sum(scan.requests.values()), scan.partial
        )
        return scan

    async def _read(
        self,
        batch_id: str,
        keeper: LeaseKeeper,
        state: PlanState,
        states: CallStates,
        meta: BatchMeta,
        previous_pages: Mapping[int, RawPage],
        known: Mapping[str, int],
        on_page: Callable[[RawPage], None] | None,
        on_held: OnHeld | None,
    ) -> CycleRead:
        settings, page_size, now = self._p, self._page_size, self._monotonic()
        plan = choose(settings, state, meta.counts, page_size, now, batch_id)
        full_pages = full_cost(meta.counts, page_size)
        requests: Counter[str] = Counter()
        anomaly = None
        distrust = False
        if plan.kind == "active":
            active = ActiveRead(
                self._upstream,
                batch_id,
                keeper,
                states=states,
                counts=meta.counts,
                state=state,
                page_size=page_size,
                completed=meta.completed,
                budget=full_pages if settings.scan == "auto" else math.inf,
                retry_within_s=settings.interval_seconds,
            )
            try:
                await active.run()
            except FullReadNeeded as fallback:
                requests["active"] += active.requests
                # Raised only by the active plan, always with a PlanReason.
                plan = Plan("full", cast(PlanReason, fallback.reason))
                anomaly = fallback.anomaly
                if anomaly is not None:
                    distrust = state.misbehaved(anomaly, now)
                elif on_held is not None and (held := active.held())[0]:
                    await on_held(*held)
            except UpstreamAuthError:
                raise
            except UpstreamError as exc:
                if not active.items:
                    raise
                log.warning(
                    "active scan of batch %s stopped after %d requests, keeping what arrived: %s",
                    batch_id,
                    active.requests,
                    exc,
                    extra={"action": "scan_partial", "batch_id": batch_id},
                )
                return _active(plan, active, now, full_pages, partial=True)
            else:
                state.filter_races = 0
                out = _active(plan, active, now, full_pages, partial=False)
                out.confirmed = active.confirmed(known)
                return out
        scan = await read_pages(
            self._upstream, batch_id, previous_pages, keeper, settings.interval_seconds, on_page
        )
        requests["full"] += len(scan.pages)
        return CycleRead(
            plan=plan,
            groups=[p.raws for p in scan.pages],
            complete=scan.complete,
            total=scan.pages[-1].total if scan.complete else None,
            partial=not scan.complete,
            pages=scan.pages,
            started=now,
            full_pages=full_pages,
            page_size=page_size,
            requests=requests,
            anomaly=anomaly,
            distrust=distrust,
            # A complete scan served every call there is; one still missing is looked up
            # again (once) by the next active cycle.
            gone=set() if scan.complete else set(state.gone),
        )


def _active(
    plan: Plan, active: ActiveRead, started: float, full_pages: int, *, partial: bool
) -> CycleRead:
    return CycleRead(
        plan=plan,
        groups=[[e.raw for e in active.items.values()]],
        complete=False,
        total=None,
        partial=partial,
        pages=None,
        started=started,
        full_pages=full_pages,
        page_size=active.page_size,
        requests=Counter(active=active.requests),
        resolve_requests=active.resolving,
        gone=active.gone,
        twice=active.served_twice(),
    )


def record(metrics: Metrics, batch_id: str, scan: CycleRead) -> None:
    """Count a cycle's requests and plan (whether or not its commit succeeds)."""
    for kind, n in scan.requests.items():
        metrics.scan_requests.labels(kind).inc(n)
    metrics.scan_plans.labels(scan.plan.kind, scan.plan.reason).inc()
    metrics.set_plan(batch_id, scan.plan.kind)
    if scan.anomaly is not None:
        metrics.upstream_anomalies.labels(scan.anomaly).inc()
        log.warning(
            "batch %s: the status filter misbehaved (%s); %s",
            batch_id,
            scan.anomaly,
            f"full scans for {FILTER_DISTRUST_S:.0f}s"
            if scan.distrust
            else "this cycle reads every page",
            extra={"action": "upstream_anomaly", "batch_id": batch_id},
        )


def settle_plan(
    state: PlanState,
    scan: CycleRead,
    committed: Iterable[Mapping[str, Any]],
    moved: int,
    suspects: Mapping[str, Suspect],
    owners: Mapping[int, str],
) -> None:
    """Move the planner's memory on once the cycle that read `scan` is committed
    (`committed`: the items that changed, in all its groups; `moved`: how many calls
    changed status; `suspects`: the calls seen going backwards, not confirmed yet;
    `owners`: the committed items' signatures)."""
    if scan.plan.kind == "full" and scan.complete:
        state.last_full_at = scan.started
    if scan.pages is not None and scan.plan.reason != "configured":
        # Only the active plan uses positions: `scan: full` spends nothing on them.
        state.place(scan.pages, owners)
    learn(
        state,
        scan.plan,
        resolve_requests=scan.resolve_requests,
        full_cost=scan.full_pages,
        moved=moved,
        page_size=scan.page_size,
    )
    state.gone = scan.gone
    state.remember(committed)
    state.backward = {call_id: s.status for call_id, s in suspects.items()}
    state.last = scan.plan
