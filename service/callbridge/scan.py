"""Reading a batch from the platform for one cycle: its pages, and second looks.

`scan_batch` reads under the plan the `planner` picks: every page (`read_pages`),
or the active plan (`active_scan`), falling back to every page in the same cycle
when the active plan cannot stand for a full scan; `settle` moves the planner's
memory and the page digests on once the cycle is committed.

A scan keeps what arrived: when a page fails after its retries (bounded by one
poll interval), the pages read so far are returned with ``complete=False`` and
their calls are committed; the next scan starts on time, so no call is blind
for longer than an outage plus one interval. Only the first page failing is an
error for the caller.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from callbridge.active_scan import ActiveScan, Fallback
from callbridge.callstate import CallState
from callbridge.config import PollerSettings
from callbridge.errors import UpstreamAuthError, UpstreamError
from callbridge.metrics import Metrics
from callbridge.models import is_backward, normalise_status
from callbridge.pages import RawPage
from callbridge.planner import FILTER_DISTRUST_S, Plan, PlanState, choose, full_cost, learn
from callbridge.store.leases import LeaseKeeper
from callbridge.upstream import UpstreamClient

log = logging.getLogger(__name__)

# Backward moves confirmed by a look-up per cycle at most; the rest wait a scan.
MAX_LOOKUPS_PER_CYCLE = 20


@dataclass(frozen=True, slots=True)
class Scan:
    pages: list[RawPage]
    # Every page arrived and the last one said there is no more.
    complete: bool


async def read_pages(
    upstream: UpstreamClient,
    batch_id: str,
    previous: Mapping[int, RawPage],
    keeper: LeaseKeeper,
    retry_within_s: float,
) -> Scan:
    """The batch's pages as far as they can be read now; raises when none arrived."""
    pages: list[RawPage] = []
    try:
        async for page in upstream.iter_pages(batch_id, previous, retry_within_s=retry_within_s):
            keeper.check()
            pages.append(page)
    except UpstreamAuthError:
        raise
    except UpstreamError as exc:
        if not pages:
            raise
        log.warning(
            "scan of batch %s stopped after %d pages, keeping them: %s",
            batch_id,
            len(pages),
            exc,
            extra={"action": "scan_partial", "batch_id": batch_id},
        )
        return Scan(pages, complete=False)
    return Scan(pages, complete=bool(pages) and not pages[-1].has_more)


async def confirm_backward_moves(
    upstream: UpstreamClient,
    batch_id: str,
    states: Mapping[str, CallState],
    suspects: Mapping[str, str],
    candidates: list[dict[str, Any]],
    retry_within_s: float,
) -> set[str]:
    """Call ids whose backward move a second observation confirms.

    The second observation is the previous scan (`suspects`: the call was seen
    backwards then too) or, at once, an ``external_id`` look-up of the call. A
    look-up showing the call where we last saw it proves the scan's copy stale:
    the look-up's item replaces it in `candidates` (so the diff sees the truth).
    """
    confirmed: set[str] = set()
    lookups = 0
    for i, item in enumerate(candidates):
        call_id = item["call_id"]
        prev = states.get(call_id)
        if prev is None or not is_backward(prev.status, normalise_status(item["status"])):
            continue
        if call_id in suspects:
            confirmed.add(call_id)
            continue
        external_id = item.get("external_id")
        if not isinstance(external_id, str) or lookups >= MAX_LOOKUPS_PER_CYCLE:
            continue
        lookups += 1
        try:
            fresh = await upstream.find_call(
                batch_id, call_id, external_id, retry_within_s=retry_within_s
            )
        except UpstreamError:
            continue  # the next scan confirms it, or not
        if fresh is None:
            continue
        candidates[i] = fresh
        if is_backward(prev.status, normalise_status(fresh["status"])):
            confirmed.add(call_id)
    return confirmed


@dataclass(slots=True)
class PlannedScan:
    """What one cycle read under its plan, ready for `select_candidates` and the diff."""

    plan: Plan
    # Item lists in the order they were served (a later copy of a call wins).
    groups: list[list[dict[str, Any]]]
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
    # The planner's `gone` set once this cycle is committed.
    gone: set[str] = field(default_factory=set)
    # Backward moves the reads themselves confirmed (no look-up needed).
    confirmed: set[str] = field(default_factory=set)


async def scan_batch(
    upstream: UpstreamClient,
    batch_id: str,
    keeper: LeaseKeeper,
    *,
    settings: PollerSettings,
    state: PlanState,
    states: Mapping[str, CallState],
    counts: Mapping[str, int],
    completed: bool,
    previous_pages: Mapping[int, RawPage],
    page_size: int,
    now: float,
) -> PlannedScan:
    """Read `batch_id` for one cycle under the plan `planner.choose` picks; an active
    plan that cannot stand for a full scan falls back to one in the same cycle.

    Raises the upstream error when nothing at all could be read.
    """
    plan = choose(settings, state, counts, page_size, now, batch_id)
    full_pages = full_cost(counts, page_size)
    requests: Counter[str] = Counter()
    anomaly = None
    if plan.kind == "active":
        active = ActiveScan(
            upstream,
            batch_id,
            keeper,
            states=states,
            counts=counts,
            state=state,
            page_size=page_size,
            completed=completed,
            budget=full_pages if settings.scan == "auto" else math.inf,
            retry_within_s=settings.interval_seconds,
        )
        try:
            await active.run()
        except Fallback as fallback:
            requests["active"] += active.requests
            plan = Plan("full", fallback.reason)
            anomaly = fallback.anomaly
            if anomaly is not None:
                state.distrust_until = now + FILTER_DISTRUST_S
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
            return _active(plan, active, now, full_pages, partial=False)
    scan = await read_pages(upstream, batch_id, previous_pages, keeper, settings.interval_seconds)
    requests["full"] += len(scan.pages)
    return PlannedScan(
        plan=plan,
        groups=[p.items for p in scan.pages],
        complete=scan.complete,
        total=scan.pages[-1].total if scan.complete else None,
        partial=not scan.complete,
        pages=scan.pages,
        started=now,
        full_pages=full_pages,
        page_size=page_size,
        requests=requests,
        anomaly=anomaly,
        # A complete scan served every call there is; one still missing is looked up
        # again (once) by the next active cycle.
        gone=set() if scan.complete else set(state.gone),
    )


def _active(
    plan: Plan, active: ActiveScan, started: float, full_pages: int, *, partial: bool
) -> PlannedScan:
    return PlannedScan(
        plan=plan,
        groups=[list(active.items.values())],
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
        confirmed=set() if partial else active.confirmed,
    )


def record(metrics: Metrics, batch_id: str, scan: PlannedScan) -> None:
    """Count a cycle's requests and plan (whether or not its commit succeeds)."""
    for kind, n in scan.requests.items():
        metrics.scan_requests.labels(kind).inc(n)
    metrics.scan_plans.labels(scan.plan.kind, scan.plan.reason).inc()
    metrics.set_plan(batch_id, scan.plan.kind)
    if scan.anomaly is not None:
        metrics.upstream_anomalies.labels(scan.anomaly).inc()
        log.warning(
            "batch %s: the status filter misbehaved (%s); full scans for %.0fs",
            batch_id,
            scan.anomaly,
            FILTER_DISTRUST_S,
            extra={"action": "upstream_anomaly", "batch_id": batch_id},
        )


def settle(
    state: PlanState,
    scan: PlannedScan,
    committed: Iterable[Mapping[str, Any]],
    digests: dict[int, RawPage],
    *,
    changed: bool,
    unconfirmed: bool,
    moved: int = 0,
) -> dict[int, RawPage]:
    """Move the planner's memory on once the cycle that read `scan` is committed;
    returns the page digests to keep for the next full scan."""
    if scan.plan.kind == "full" and scan.complete:
        state.last_full_at = scan.started
    if scan.pages is not None:
        state.place(scan.pages)
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
    state.last = scan.plan
    if unconfirmed:
        # A backward move waits to be seen again: its page must be read, not skipped
        # as unchanged (which would leave the move unconfirmed for as long).
        return {}
    if scan.pages is not None and scan.complete:
        return {p.page: dataclasses.replace(p, items=[], unchanged=False) for p in scan.pages}
    if scan.pages is not None or changed:
        # Pages that did not arrive keep no digest, nor pages whose calls an active
        # cycle moved since (a digest stands for the snapshot of its calls).
        return {}
    return digests
