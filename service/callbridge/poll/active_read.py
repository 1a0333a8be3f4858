"""The active plan: one cycle's reading of only the calls that can have changed.

`ActiveRead.run` reads, in order:

1. ``status=pending&limit=1``: only its ``total``;
2. every page of each active status's list (``status=queued`` ...): new arrivals
   and moves show there, and every item must carry the status asked for;
3. when the counts do not add up (`planner.Books`): calls that vanished from the
   active lists (those the snapshot has there, and those the last cycle saw moving
   back there, unconfirmed) are looked up by ``external_id`` (matched by ``call_id``) when few;
   otherwise, and always when more calls left ``pending`` before the probe than the
   reads found (calls that ended without passing an active status), the tail of each
   terminal status's list, largest first, until everything is explained (lists come
   in creation order and calls are dialled in it, so what just ended is near the
   end); the active lists once more if calls are still missing (they moved from one
   active status to the next while the lists were read); a terminal list with calls
   still unseen is read up to two pages further back.

Backward moves go through the same second look as a full scan's
(`second_look.confirm_backward_moves`), but for what only reads within a cycle can
see: a call served twice going back (`served_twice`) is a first look that must end as
a reported redial (confirmed next cycle, whatever the call shows then: `second_look`);
served twice going back, then elsewhere as a new item, it is confirmed at once
(`ActiveRead.confirmed`). What the reads served twice, and what they saw going back,
survives a fall-back to a full scan (`held`: `reader.BatchReader.read` commits it
first).

The platform moves while we read. Calls that leave ``pending`` during the reads may
be found or not; when more are found than the first probe allows, a second probe
tells whether they left meanwhile or calls came back to ``pending`` unseen. Counts of
terminal lists are taken at different moments, so they only steer where to look.

`FullReadNeeded` is raised when a call that left ``pending`` or an active list is still
not found, when resolving would cost more than a full scan (``budget``), when the
status filter misbehaves, or when every call looks finished (only a full scan may
complete a batch): the caller then reads every page. An active plan never stands
for a complete scan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from callbridge.errors import FullReadNeeded
from callbridge.models import PENDING, is_backward, normalise_status
from callbridge.poll.pages import PageEntry, RawPage, signature
from callbridge.poll.planner import (
    TERMINAL_ORDER,
    Books,
    PlanState,
    active_statuses,
    filtered_page_problem,
    reaching_back,
    window,
)
from callbridge.poll.upstream import UpstreamClient
from callbridge.store.callstate import CallStates
from callbridge.store.leases import LeaseKeeper

log = logging.getLogger(__name__)

# The frontier page (`ActiveRead._read_frontier`) is read while it explains at least
# this share of what moved (EWMA); skipped, the share creeps back up to retry it.
_FRONTIER_MIN_HITS = 0.25
_FRONTIER_RETRY = 0.02
_EWMA = 0.3
# Pages a terminal list is read back from its tail to find calls not seen yet.
_CHASE_PAGES = 2
# Pages past what `total` implies before a filtered list counts as paging forever.
_EXTRA_PAGES_ALLOWED = 5


@dataclass(slots=True)
class _Tail:
    """Where this cycle read one terminal status's list: from page `first` on, in
    pages of `limit` (`tail_start`: the first page read)."""

    first: int
    limit: int
    tail_start: int


class ActiveRead:
    """The active plan of one cycle of one batch."""

    def __init__(
        self,
        upstream: UpstreamClient,
        batch_id: str,
        keeper: LeaseKeeper,
        *,
        states: CallStates,
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
        # Every call served this cycle, the copy for the diff (see `_observe`).
        self.items: dict[str, PageEntry] = {}
        # call_id -> status of that copy, and how many reads served it so this cycle.
        self._kept: dict[str, tuple[str, int]] = {}
        # Calls served elsewhere after the copy kept: their latest copy.
        self._moved_on: dict[str, PageEntry] = {}
        self.gone = set(state.gone)
        self.requests = 0
        self.resolving = 0
        self._listed: dict[str, set[str]] = {}
        self._pending_before = 0
        # Where the first call still pending sat in the list at the first probe.
        self._first_pending = math.inf
        self._tails: dict[str, _Tail] = {}

    async def run(self) -> None:
        """Read; raises `FullReadNeeded` when the cycle needs a full scan instead."""
        # The pending total first: every call that left pending before it must be
        # found by the reads that follow (those that leave while they run may be).
        probe, first = await self._page(PENDING, 1, 1)
        self._pending_before = probe.total
        if first:
            self._first_pending = self._state.positions.get(first[0].call_id, math.inf)
        for status in active_statuses(self._counts):
            self._listed[status] = set()
            await self._read_list(status)
        vanished: list[str] = []
        frontier = math.inf  # where the first call still pending sits in the list
        positions = self._state.positions
        status_of = self._states.status  # no decoding: this loop sees every call
        for call_id in self._states:
            if call_id in self.items or call_id in self.gone:
                continue
            stored = status_of(call_id)
            if stored in self._listed:
                vanished.append(call_id)
            elif stored == PENDING:
                frontier = min(frontier, positions.get(call_id, math.inf))
        for call_id, seen in self._state.backward.items():
            # Seen back in an active list last cycle, not confirmed yet: gone from it
            # now, it moved on (a redial that ended) and must be found like the others.
            unseen = call_id not in self.items and call_id not in self.gone
            if unseen and seen in self._listed and status_of(call_id) not in self._listed:
                vanished.append(call_id)
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
            raise FullReadNeeded("unexplained")
        known = any(n > 0 for n in self.books.expected.values())
        served = {c: normalise_status(e.status) for c, e in self.items.items()}
        if not self._completed and known and self.books.open_calls(self._states, served) == 0:
            raise FullReadNeeded("completion")

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
        call still pending. The page ends past the calls that left pending (past the
        call the pending probe served first) and reaches back as far as a page can:
        calls dialled lately are there, those that vanished from the active lists and
        any redialled since and ended again (a finished call to another, which no list
        and no count shows). Skipped for a while when it explained little lately."""
        state = self._state
        if frontier == math.inf or state.frontier_hits < _FRONTIER_MIN_HITS:
            state.frontier_hits += _FRONTIER_RETRY
            return
        end = int(frontier) + max(0, self._pending_gap())
        if self._first_pending < math.inf:
            end = max(end, int(self._first_pending))
        high = end + max(1, self._size // 20)
        page_no, limit = reaching_back(high, self._size)
        unexplained = len(vanished) + max(0, self._pending_gap())
        self._afford(1)
        self.requests += 1
        page = await self._upstream.fetch_page(
            self._batch, page_no, limit, retry_within_s=self._retry_s
        )
        self._keeper.check()
        for e in page.entries:
            self._observe(e)
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
        self._tails[status] = _Tail(page_no, limit, page_no)
        page, _ = await self._page(status, page_no, limit)
        while page.has_more:
            self._check_endless(page_no + 1, page)
            self._afford(1)
            page_no += 1
            page, _ = await self._page(status, page_no, limit)

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
            tail.first -= 1
            await self._page(status, tail.first, tail.limit)

    async def _read_list(self, status: str) -> None:
        page_no = 1
        while True:
            page, entries = await self._page(status, page_no, self._size)
            self._listed[status].update(e.call_id for e in entries)
            if not page.has_more:
                return
            page_no += 1
            self._check_endless(page_no, page)

    def _check_endless(self, page_no: int, page: RawPage) -> None:
        if page_no > math.ceil(page.total / max(1, page.limit)) + _EXTRA_PAGES_ALLOWED:
            raise FullReadNeeded("anomaly", "status_filter_total")

    async def _page(self, status: str, page_no: int, limit: int) -> tuple[RawPage, list[PageEntry]]:
        """One page of `status`'s list, checked against what the filter promises."""
        self.requests += 1
        page = await self._upstream.fetch_page(
            self._batch, page_no, limit, status=status, retry_within_s=self._retry_s
        )
        self._keeper.check()
        entries = page.entries
        problem = filtered_page_problem(page, entries, status, page_no)
        if problem is not None:
            raise FullReadNeeded("anomaly", problem)
        self.books.totals[status] = page.total
        for e in entries:
            self._observe(e)
        return page, entries

    async def _lookup(self, call_id: str, external_id: str) -> None:
        self.requests += 1
        found = await self._upstream.find_call(
            self._batch, call_id, external_id, retry_within_s=self._retry_s
        )
        self._keeper.check()
        if found is None:
            # Not served any more: left as it is, as a full scan would leave it.
            self.gone.add(call_id)
            self.books.forget(call_id)
        else:
            self._observe(found)

    def _observe(self, e: PageEntry) -> None:
        """Note a served copy of a call. The books follow the latest; the cycle keeps
        the latest copy too, unless an earlier one showed a new status twice (the
        platform served it twice: it must be reported, and would be lost under a later
        copy, as a full scan never sees it): that one is kept for the diff, and the
        next cycle finds the call where it has gone since (it left that list)."""
        call_id, status = e.call_id, normalise_status(e.status)
        kept = self._kept.get(call_id)
        if kept is None or kept[0] == status:
            self.items[call_id] = e
            self._kept[call_id] = (status, 1 if kept is None else kept[1] + 1)
        elif kept[1] < 2 or kept[0] == self._states.status(call_id):
            self.items[call_id] = e
            self._kept[call_id] = (status, 1)
        else:
            self._moved_on[call_id] = e
        self.gone.discard(call_id)
        self.books.observe(call_id, status)

    def served_twice(self) -> set[str]:
        """Calls whose copy for the diff this cycle's reads served at least twice, in
        another status than the snapshot's: the platform served that status twice,
        so it must be reported whatever the call did next (`second_look.confirm_backward_moves`
        takes the two answers going back for a redial unless a look-up shows the call
        as committed; see `held` for a cycle falling back to a full scan)."""
        status_of = self._states.status
        return {c for c, (s, n) in self._kept.items() if n >= 2 and s != status_of(c)}

    def held(self) -> tuple[list[bytes], set[str]]:
        """What a cycle falling back to a full scan commits first, and which of it the
        reads served twice: the copies served twice (the full scan may find those calls
        moved on, or back where we knew them after a redial, and never reports what it
        does not see; a backward one is confirmed), and every backward one (a first
        look, so that the full scan serving it again is the second)."""
        twice = self.served_twice()
        status_of = self._states.status
        raws = [
            e.raw
            for c, e in self.items.items()
            if c in twice or is_backward(status_of(c) or PENDING, self._kept[c][0])
        ]
        return raws, twice

    def confirmed(self, known: Mapping[str, int]) -> set[str]:
        """Backward moves this cycle's reads confirm (`known`: each call's item
        signature as last committed): served twice going back, then served again
        elsewhere, as a new item. The platform moved the call on while we read, so
        the backward status was a redial, which a second look next cycle would come
        too late to see (``no_answer``, redialled, ``ringing`` twice, ``no_answer``
        again). Served back as it was committed, the backward copies were stale."""
        out = set()
        for call_id, later in self._moved_on.items():
            stored = self._states.status(call_id)
            if stored is None or not is_backward(stored, self._kept[call_id][0]):
                continue
            if signature(later.raw) != known.get(call_id):
                out.add(call_id)
        return out

    def _afford(self, n: int) -> None:
        if self.resolving + n > self._budget:
            raise FullReadNeeded("costly")
        self.resolving += n
