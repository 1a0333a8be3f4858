"""The active plan: one cycle's reading of only the calls that can have changed.

`ActiveScan.run` reads, in order:

1. ``status=pending&limit=1``: only its ``total``;
2. every page of each active status's list (``status=queued`` ...): new arrivals
   and moves show there, and every item must carry the status asked for;
3. when the counts do not add up (`planner.Books`): calls that vanished from the
   active lists are looked up by ``external_id`` (matched by ``call_id``) when few;
   otherwise, and always when more calls left ``pending`` before the probe than the
   reads found (calls that ended without passing an active status), the tail of each
   terminal status's list, largest first, until everything is explained (lists come
   in creation order and calls are dialled in it, so what just ended is near the
   end); the active lists once more if calls are still missing (they moved from one
   active status to the next while the lists were read); a terminal list with calls
   still unseen is read up to two pages further back;
4. for a call seen back in an active status from a terminal one (a redial, or a
   stale copy), the tail of that terminal list: a call absent from where it must be
   (positions are known from the last full scan) has left it, which confirms the
   move without a look-up. A move back between active statuses is confirmed by its
   absence from the old status's list, read whole.

The platform moves while we read. Calls that leave ``pending`` during the reads may
be found or not; when more are found than the first probe allows, a second probe
tells whether they left meanwhile or calls came back to ``pending`` unseen. Counts of
terminal lists are taken at different moments, so they only steer where to look.

`Fallback` is raised when a call that left ``pending`` or an active list is still
not found, when resolving would cost more than a full scan (``budget``), when the
status filter misbehaves, or when every call looks finished (only a full scan may
complete a batch): the caller then reads every page. An active plan never stands
for a complete scan.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from callbridge.callstate import CallState
from callbridge.models import PENDING, is_backward, normalise_status
from callbridge.pages import RawPage
from callbridge.planner import (
    TERMINAL_ORDER,
    Books,
    PlanReason,
    PlanState,
    active_statuses,
    back_from_terminal,
    filtered_page_problem,
    window,
)
from callbridge.store.leases import LeaseKeeper
from callbridge.upstream import UpstreamClient

log = logging.getLogger(__name__)

# The frontier page (`ActiveScan._read_frontier`) is read while it explains at least
# this share of what moved (EWMA); skipped, the share creeps back up to retry it.
_FRONTIER_MIN_HITS = 0.25
_FRONTIER_RETRY = 0.02
_EWMA = 0.3
# Pages a terminal list is read back from its tail to find calls not seen yet.
_CHASE_PAGES = 2
# Pages past what `total` implies before a filtered list counts as paging forever.
_EXTRA_PAGES_ALLOWED = 5


class Fallback(Exception):
    """This cycle needs a full scan, for `reason` (and `anomaly`: the filter misbehaved)."""

    def __init__(self, reason: PlanReason, anomaly: str | None = None) -> None:
        super().__init__(reason)
        self.reason: PlanReason = reason
        self.anomaly = anomaly


@dataclass(slots=True)
class _Tail:
    """What this cycle read of one terminal status's list: pages ``first..last``."""

    first: int
    last: int
    limit: int
    tail_start: int
    at_end: bool = False
    # Creation positions (from the last full scan) of the items, per page read.
    positions: dict[int, list[int]] = field(default_factory=dict)
    served: set[str] = field(default_factory=set)
    # Calls the snapshot places in this status within the span read (when asked).
    members: set[str] | None = None


class ActiveScan:
    """The active plan of one cycle of one batch."""

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
        self._size = self.page_size = page_size
        self._completed = completed
        self._budget = budget
        self._retry_s = retry_within_s
        self.books = Books(states, counts, state.gone)
        self.items: dict[str, dict[str, Any]] = {}
        self.gone = set(state.gone)
        # Backward moves this cycle's reads confirm (see module docstring, step 4).
        self.confirmed: set[str] = set()
        self.requests = 0
        self.resolving = 0
        self._listed: dict[str, set[str]] = {}
        self._pending_before = 0
        self._tails: dict[str, _Tail] = {}
        # call_id -> the requests that served it behind where the snapshot has it.
        self._backward_in: dict[str, set[int]] = {}

    async def run(self) -> None:
        """Read; raises `Fallback` when the cycle needs a full scan instead."""
        # The pending total first: every call that left pending before it must be
        # found by the reads that follow (those that leave while they run may be).
        self._pending_before = (await self._page(PENDING, 1, 1)).total
        for status in active_statuses(self._counts):
            self._listed[status] = set()
            await self._read_list(status)
        vanished: list[str] = []
        frontier = math.inf  # where the first call still pending sits in the list
        positions = self._state.positions
        for call_id, st in self._states.items():
            if call_id in self.items or call_id in self.gone:
                continue
            if st.status in self._listed:
                vanished.append(call_id)
            elif st.status == PENDING:
                frontier = min(frontier, positions.get(call_id, math.inf))
        # The budget covers the whole cycle: what the lists took is spent already.
        self._budget -= self.requests
        if vanished or self._pending_gap() > 0:
            await self._read_frontier(vanished, frontier)
            await self._explain(vanished)
        if self._pending_gap() > 0:
            # Calls that left pending before the probe and are nowhere we looked moved
            # from one active status to the next while the lists were read: once more.
            self._afford(len(self._listed))
            for status in self._listed:
                await self._read_list(status)
        redialled = back_from_terminal(self._states, self.items)
        once = {old for c, old in redialled.items() if len(self._backward_in.get(c, ())) < 2}
        for status in sorted(once - self._tails.keys()):
            if self.resolving + 1 <= self._budget:
                self.resolving += 1
                await self._read_tail(status)
        await self._chase()
        unexplained = [c for c in vanished if c not in self.items and c not in self.gone]
        if self._pending_gap() < 0:
            # More calls left pending than before the first probe: left while we read,
            # or calls came to pending unseen; the pending total now tells which.
            await self._page(PENDING, 1, 1)
        if self._pending_gap() or unexplained:
            log.info(
                "batch %s: %d calls left pending and %d left the active lists unseen; "
                "reading every page",
                self._batch,
                self._pending_gap(),
                len(unexplained),
                extra={"action": "scan_fallback", "batch_id": self._batch},
            )
            raise Fallback("unexplained")
        self._confirm(redialled)
        known = any(n > 0 for n in self.books.expected.values())
        open_after = self.books.open_calls(self._states, self.items, self.confirmed)
        if not self._completed and known and open_after == 0:
            raise Fallback("completion")

    def _pending_gap(self) -> int:
        """> 0: calls left pending unseen; < 0: calls came to pending unseen.

        Before the second probe (see `run`), against the first one; after it, a call
        that left pending between the two may have been found or not: either is right.
        """
        expected, now = self.books.expected[PENDING], self.books.totals[PENDING]
        if expected > self._pending_before:
            return expected - self._pending_before
        return min(0, expected - now)

    async def _read_frontier(self, vanished: list[str], frontier: float) -> None:
        """One page of the whole list where the dialler works: calls leave pending in
        creation order, so those that left and those just ended sit around the first
        call still pending. Skipped for a while when it explained little lately."""
        state = self._state
        if frontier == math.inf or state.frontier_hits < _FRONTIER_MIN_HITS:
            state.frontier_hits += _FRONTIER_RETRY
            return
        positions = state.positions
        high = int(frontier) + max(0, self._pending_gap()) + max(1, self._size // 20)
        low = min([int(frontier)] + [positions[c] for c in vanished if c in positions])
        page_no, limit = window(max(low, high - self._size), high, self._size)
        unexplained = len(vanished) + max(0, self._pending_gap())
        self._afford(1)
        self.requests += 1
        page = await self._upstream.fetch_page(
            self._batch, page_no, limit, retry_within_s=self._retry_s
        )
        self._keeper.check()
        for item in page.items:
            self._observe(item)
        left = sum(1 for c in vanished if c not in self.items) + max(0, self._pending_gap())
        hits = (unexplained - left) / max(1, unexplained)
        state.frontier_hits = (1 - _EWMA) * state.frontier_hits + _EWMA * hits

    async def _explain(self, vanished: list[str]) -> None:
        ext = self._state.external_ids
        lookable = all(c in ext for c in vanished)
        if self._pending_gap() > 0 or not lookable or len(vanished) > len(TERMINAL_ORDER):
            # Largest first: most of what ended is there.
            for status in sorted(TERMINAL_ORDER, key=lambda t: -self.books.expected[t]):
                if self._pending_gap() <= 0 and all(c in self.items for c in vanished):
                    break
                self._afford(1)
                await self._read_tail(status)
        # The rest one by one (those without an external id stay unexplained).
        left = [c for c in vanished if c not in self.items and c in ext]
        self._afford(len(left))
        for call_id in left:
            await self._lookup(call_id, ext[call_id])

    async def _read_tail(self, status: str) -> None:
        """The end of `status`'s list: half a page before where it ended as far as we
        know, a quarter after (it grows at the end: calls are dialled in order)."""
        end = self.books.expected[status]
        page_no, limit = window(end - self._size // 2, end + self._size // 4, self._size)
        tail = self._tails[status] = _Tail(page_no, page_no, limit, page_no)
        page = await self._tail_page(status, tail, page_no)
        while page.has_more:
            self._check_endless(page_no + 1, page)
            self._afford(1)
            page_no += 1
            page = await self._tail_page(status, tail, page_no)
        tail.at_end = True

    async def _chase(self) -> None:
        """Read a little further back in the terminal lists that hold calls not seen
        yet (a redial that ended where its first attempt had).

        Best effort: the counts of terminal lists read at different moments are only
        as exact as a world that stands still while we read; what a chase does not
        find here, the next cycle or the periodic full scan does.
        """
        for _ in range(_CHASE_PAGES * len(TERMINAL_ORDER)):
            behind = [
                (self.books.imbalance(t), t)
                for t, tail in self._tails.items()
                if tail.tail_start - tail.first < _CHASE_PAGES
                and tail.first > 1
                and self.books.imbalance(t) > 0
            ]
            if not behind or self.resolving + 1 > self._budget:
                return
            _, status = max(behind)
            self.resolving += 1
            tail = self._tails[status]
            await self._tail_page(status, tail, tail.first - 1)

    async def _tail_page(self, status: str, tail: _Tail, page_no: int) -> RawPage:
        page = await self._page(status, page_no, tail.limit)
        tail.first, tail.last = min(tail.first, page_no), max(tail.last, page_no)
        positions = self._state.positions
        tail.positions[page_no] = [
            positions[i["call_id"]] for i in page.items if i["call_id"] in positions
        ]
        tail.served.update(i["call_id"] for i in page.items)
        return page

    async def _read_list(self, status: str) -> None:
        page_no = 1
        while True:
            page = await self._page(status, page_no, self._size)
            self._listed[status].update(i["call_id"] for i in page.items)
            if not page.has_more:
                return
            page_no += 1
            self._check_endless(page_no, page)

    def _check_endless(self, page_no: int, page: RawPage) -> None:
        if page_no > math.ceil(page.total / max(1, page.limit)) + _EXTRA_PAGES_ALLOWED:
            raise Fallback("anomaly", "status_filter_total")

    async def _page(self, status: str, page_no: int, limit: int) -> RawPage:
        self.requests += 1
        page = await self._upstream.fetch_page(
            self._batch, page_no, limit, status=status, retry_within_s=self._retry_s
        )
        self._keeper.check()
        problem = filtered_page_problem(page, status, page_no)
        if problem is not None:
            raise Fallback("anomaly", problem)
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
        status = normalise_status(item["status"])
        self.items[call_id] = item
        self.gone.discard(call_id)
        self.books.observe(call_id, status)
        prev = self._states.get(call_id)
        if prev is not None and is_backward(prev.status, status):
            self._backward_in.setdefault(call_id, set()).add(self.requests)

    def _afford(self, n: int) -> None:
        if self.resolving + n > self._budget:
            raise Fallback("costly")
        self.resolving += n

    def _confirm(self, redialled: Mapping[str, str]) -> None:
        for call_id, item in self.items.items():
            prev = self._states.get(call_id)
            status = normalise_status(item["status"])
            if prev is None or not is_backward(prev.status, status):
                continue
            if not isinstance(item.get("external_id"), str):
                # A full scan could not look it up either: it waits for the next
                # cycle's second look, as there.
                continue
            old = prev.status
            if len(self._backward_in.get(call_id, ())) >= 2:
                absent = True  # two reads agree: the second look a look-up would be
            elif old in self._listed:
                absent = call_id not in self._listed[old]
            else:
                absent = old in self._tails and self._absent(old, self._tails[old], call_id)
            if absent:
                self.confirmed.add(call_id)

    def _absent(self, status: str, tail: _Tail, call_id: str) -> bool:
        """Whether the pages of `tail` (of `status`'s list) prove `call_id` is not in it:
        its creation position lies within what they cover, and they came in creation
        order, holding every other call we place there in that span."""
        positions = self._state.positions
        pos = positions.get(call_id)
        if pos is None or call_id in tail.served:
            return False
        seen = [p for page in sorted(tail.positions) for p in tail.positions[page]]
        if any(a >= b for a, b in itertools.pairwise(seen)):
            return False  # not in creation order: positions tell nothing here
        low = -1 if tail.first == 1 else (seen[0] if seen else math.inf)
        high = math.inf if tail.at_end else (seen[-1] if seen else -1)
        if not low < pos < high:
            return False
        if tail.members is None:
            tail.members = {
                c
                for c, st in self._states.items()
                if st.status == status and low <= positions.get(c, -2) <= high
            }
        # Every call we place in that span is served there, or seen elsewhere now.
        return all(c in tail.served or c in self.items for c in tail.members)
