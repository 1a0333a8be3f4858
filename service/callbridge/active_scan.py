"""One cycle's reading under its plan: the active plan's requests, or a full scan.

`scan_batch` asks the `planner` for the cycle's plan and reads accordingly. The
active plan (`ActiveScan`) reads, in order:

1. every page of each active status's list (``status=queued`` ...): new arrivals
   and moves show there, and every item must carry the status asked for;
2. ``status=pending&limit=1``: only its ``total``;
3. when the counts do not add up (`planner.Books`): calls that vanished from the
   active lists are looked up by ``external_id`` (matched by ``call_id``) when few;
   otherwise, and always when ``pending`` shrank by more than the arrivals explain
   (calls that ended without passing an active status), the tail of each terminal
   status's list, largest first, until everything is explained; a list with
   arrivals still unseen is read further back.

Whatever still does not add up, costs more than a full scan (``auto``), or shows the
status filter misbehaving makes the cycle read every page instead ("fallback"); so
does a batch whose calls all look finished, since only a full scan may complete it.
The active plan never reports ``complete``: it does not re-read finished calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from callbridge.callstate import CallState
from callbridge.config import PollerSettings
from callbridge.errors import UpstreamAuthError, UpstreamError
from callbridge.metrics import Metrics
from callbridge.models import PENDING, TERMINAL_STATUSES, is_backward, normalise_status
from callbridge.pages import RawPage
from callbridge.planner import (
    FILTER_DISTRUST_S,
    TERMINAL_ORDER,
    Books,
    Plan,
    PlanReason,
    PlanState,
    active_statuses,
    choose,
    filtered_page_problem,
    full_cost,
    learn,
    window,
)
from callbridge.scan import read_pages
from callbridge.store.leases import LeaseKeeper
from callbridge.upstream import UpstreamClient

log = logging.getLogger(__name__)

# Pages past what `total` implies before a filtered list counts as paging forever.
_EXTRA_PAGES_ALLOWED = 5


@dataclass(slots=True)
class PlannedScan:
    """What one cycle read, ready for `select_candidates` and the diff."""

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
    # When the cycle's plan was chosen (monotonic) and what a full scan costs.
    started: float = 0.0
    full_pages: int = 1
    requests: Counter[str] = field(default_factory=Counter)
    resolve_requests: int = 0
    anomaly: str | None = None
    # The planner's `gone` set once this cycle is committed.
    gone: set[str] = field(default_factory=set)


class _Fallback(Exception):  # control flow, never escapes this module
    def __init__(self, reason: PlanReason, anomaly: str | None = None) -> None:
        super().__init__(reason)
        self.reason: PlanReason = reason
        self.anomaly = anomaly


class ActiveScan:
    """The active plan of one cycle of one batch; `run` raises `_Fallback` when it
    cannot stand for a full scan."""

    def __init__(
        self,
        upstream: UpstreamClient,
        batch_id: str,
        keeper: LeaseKeeper,
        *,
        states: Mapping[str, CallState],
        counts: Mapping[str, int],
        state: PlanState,
        page_size: int,
        completed: bool,
        budget: float,
        retry_within_s: float,
    ) -> None:
        self._upstream = upstream
        self._batch = batch_id
        self._keeper = keeper
        self._states = states
        self._counts = counts
        self._state = state
        self._size = page_size
        self._completed = completed
        self._budget = budget
        self._retry_s = retry_within_s
        self.books = Books(states, counts, state.gone)
        self.items: dict[str, dict[str, Any]] = {}
        self.gone = set(state.gone)
        self.requests = 0
        self.resolving = 0
        # Per terminal status read: (first page read, its limit, first position read).
        self._tails: dict[str, tuple[int, int, int]] = {}

    async def run(self) -> None:
        listed = active_statuses(self._counts)
        for status in listed:
            await self._read_list(status)
        probe = await self._page(PENDING, 1, 1)
        self.books.totals[PENDING] = probe.total
        listed_set = set(listed)
        vanished = [
            call_id
            for call_id, st in self._states.items()
            if st.status in listed_set and call_id not in self.items and call_id not in self.gone
        ]
        if vanished or self._pending_gap():
            await self._resolve(vanished)
        known = any(n > 0 for n in self.books.expected.values())
        if not self._completed and known and self._open_after() == 0:
            raise _Fallback("completion")

    def _open_after(self) -> int:
        """Calls the diff will hold in a non-terminal status: a backward move counts
        as not made, as the diff holds it until a second look confirms it."""
        n = self.books.open_calls()
        for call_id, item in self.items.items():
            prev = self._states.get(call_id)
            status = normalise_status(item["status"])
            if prev is not None and is_backward(prev.status, status):
                n += (prev.status not in TERMINAL_STATUSES) - (status not in TERMINAL_STATUSES)
        return n

    def _pending_gap(self) -> int:
        """> 0: calls left pending unseen; < 0: calls came to pending unseen."""
        return self.books.expected[PENDING] - self.books.totals[PENDING]

    async def _resolve(self, vanished: list[str]) -> None:
        ext = self._state.external_ids
        lookable = all(c in ext for c in vanished)
        if self._pending_gap() > 0 or not lookable or len(vanished) > len(TERMINAL_ORDER):
            await self._read_tails(vanished)
        left = [c for c in vanished if c not in self.items]
        if left:
            if not all(c in ext for c in left):
                raise _Fallback("unexplained")
            self._afford(len(left))
            for call_id in left:
                await self._lookup(call_id, ext[call_id])
        await self._chase()
        if self._pending_gap() != 0:
            raise _Fallback("unexplained")
        if any(self.books.imbalance(t) for t in self._tails):
            raise _Fallback("unexplained")

    def _unexplained(self, vanished: list[str]) -> bool:
        return self._pending_gap() > 0 or any(c not in self.items for c in vanished)

    async def _read_tails(self, vanished: list[str]) -> None:
        """The end of each terminal status's list, largest first, until every call that
        left pending or vanished from the active lists is found."""
        order = sorted(TERMINAL_ORDER, key=lambda t: -self.books.expected[t])
        quarter = max(1, self._size // 4)
        for status in order:
            if not self._unexplained(vanished):
                return
            end = self.books.expected[status]
            page_no, limit = window(end - quarter, end + quarter, self._size)
            self._afford(1)
            page = await self._page(status, page_no, limit)
            self._tails[status] = (page_no, limit, (page_no - 1) * max(1, page.limit))
            while page.has_more:
                page_no += 1
                self._check_endless(status, page_no, page)
                self._afford(1)
                page = await self._page(status, page_no, limit)

    async def _chase(self) -> None:
        """Read further back in the terminal lists that hold calls not seen yet."""
        while True:
            behind = [
                (self.books.imbalance(t), t)
                for t, (_, _, first) in self._tails.items()
                if first > 0 and self.books.imbalance(t) > 0
            ]
            if not behind:
                return
            _, status = max(behind)
            page_no, limit, _ = self._tails[status]
            self._afford(1)
            page = await self._page(status, page_no - 1, limit)
            self._tails[status] = (page_no - 1, limit, (page_no - 2) * max(1, page.limit))

    async def _read_list(self, status: str) -> None:
        page_no = 1
        while True:
            page = await self._page(status, page_no, self._size)
            if not page.has_more:
                return
            page_no += 1
            self._check_endless(status, page_no, page)

    def _check_endless(self, status: str, page_no: int, page: RawPage) -> None:
        if page_no > math.ceil(page.total / max(1, page.limit)) + _EXTRA_PAGES_ALLOWED:
            raise _Fallback("anomaly", "status_filter_total")

    async def _page(self, status: str, page_no: int, limit: int) -> RawPage:
        self.requests += 1
        page = await self._upstream.fetch_page(
            self._batch, page_no, limit, status=status, retry_within_s=self._retry_s
        )
        self._keeper.check()
        problem = filtered_page_problem(page, status, page_no)
        if problem is not None:
            raise _Fallback("anomaly", problem)
        self.books.totals[status] = page.total
        for item in page.items:
            self._observe(item)
        return page

    async def _lookup(self, call_id: str, external_id: str) -> None:
        self.requests += 1
        item = await self._upstream.find_call(
            self._batch, call_id, external_id, retry_within_s=self._retry_s
        )
        self._keeper.check()
        if item is None:
            # Not served any more: left as it is, as a full scan would leave it.
            self.gone.add(call_id)
            self.books.forget(call_id)
        else:
            self._observe(item)

    def _observe(self, item: dict[str, Any]) -> None:
        call_id = item["call_id"]
        self.items[call_id] = item
        self.gone.discard(call_id)
        self.books.observe(call_id, normalise_status(item["status"]))

    def _afford(self, n: int) -> None:
        if self.resolving + n > self._budget:
            raise _Fallback("costly")
        self.resolving += n


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
    """Read `batch_id` for one cycle under the plan `planner.choose` picks.

    Raises the upstream error when nothing at all could be read.
    """
    plan = choose(settings, state, counts, page_size, now)
    requests: Counter[str] = Counter()
    anomaly = None
    full_pages = full_cost(counts, page_size)
    if plan.kind == "active":
        budget = full_pages if settings.scan == "auto" else math.inf
        active = ActiveScan(
            upstream,
            batch_id,
            keeper,
            states=states,
            counts=counts,
            state=state,
            page_size=page_size,
            completed=completed,
            budget=budget,
            retry_within_s=settings.interval_seconds,
        )
        try:
            await active.run()
        except _Fallback as fallback:
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
            return _active_result(plan, active, now, full_pages, partial=True)
        else:
            return _active_result(plan, active, now, full_pages, partial=False)
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
        requests=requests,
        anomaly=anomaly,
        # A complete scan served every call there is; a call still missing is looked up
        # again (once) by the next active cycle.
        gone=set() if scan.complete else set(state.gone),
    )


def _active_result(
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
        requests=Counter(active=active.requests),
        resolve_requests=active.resolving,
        gone=active.gone,
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
) -> dict[int, RawPage]:
    """Move the planner's memory on once the cycle that read `scan` is committed;
    returns the page digests to keep for the next full scan."""
    if scan.plan.kind == "full" and scan.complete:
        state.last_full_at = scan.started
    learn(state, scan.plan, resolve_requests=scan.resolve_requests, full_cost=scan.full_pages)
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
