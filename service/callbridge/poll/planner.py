"""Which requests a poll cycle makes: a full scan, or the active plan. Pure, no I/O.

A campaign is mostly calls waiting in ``pending`` or already finished; only the
calls on the lines can change. The **active plan** reads just those: every
non-pending, non-terminal status with the ``status`` filter, and ``total`` of
``pending`` with a one-item probe. `Books` then compares what the platform
counts per status with what the snapshot plus this cycle's observations say;
what does not add up is resolved (an ``external_id`` look-up of a call that
vanished from its list, the tail of a terminal status's list for calls that
ended unseen) or, when that fails or costs more, the cycle falls back to a full
scan. A **full scan** reads every page; it is the only plan that covers every
call, so only it may complete a batch.

`choose` picks the plan of a cycle: full on first sight (and after a take-over,
which starts cold), every ``full_scan_every_seconds`` (edits of finished calls
and moves among terminal statuses are invisible to the active plan), while the
status filter is distrusted, and whenever it is cheaper; active otherwise.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from callbridge.config import PollerSettings
from callbridge.models import (
    ANSWERED,
    IN_PROGRESS,
    KNOWN_STATUSES,
    PENDING,
    QUEUED,
    RINGING,
    TERMINAL_STATUSES,
    is_backward,
    normalise_status,
)
from callbridge.poll.pages import PageEntry, RawPage, entry
from callbridge.store.callstate import CallState, CallStates

PlanKind = Literal["full", "active"]
# Why a cycle read what it read (a label of callbridge_scan_plans_total):
# configured: poller.scan says so; cold: first cycle of this owner; periodic:
# full_scan_every_seconds is up; distrust: the status filter misbehaved lately;
# cheaper: the cost estimates; then the fallbacks of an active cycle: costly (resolving
# would cost more than a full scan), unexplained (the counts do not add up),
# completion (every call looks finished: only a full scan may complete a batch),
# anomaly (the status filter misbehaved this cycle).
PlanReason = Literal[
    "configured",
    "cold",
    "periodic",
    "distrust",
    "cheaper",
    "costly",
    "unexplained",
    "completion",
    "anomaly",
]
PLAN_KINDS: tuple[PlanKind, ...] = ("full", "active")

# Statuses read with the filter every active cycle, in lifecycle order; unknown
# non-terminal statuses the snapshot holds are read too.
ACTIVE_STATUSES: tuple[str, ...] = (QUEUED, RINGING, ANSWERED, IN_PROGRESS)
TERMINAL_ORDER: tuple[str, ...] = tuple(s for s in KNOWN_STATUSES if s in TERMINAL_STATUSES)
# After the status filter misbehaved, full scans only for this long.
FILTER_DISTRUST_S = 3600.0
# A filtered page whose item count misses what its `total` implies by at most this
# many: a call moved in or out of the list between the server's count and its query.
# A race, not a broken filter: that cycle reads every page, nothing more...
FILTER_RACE_ITEMS = 1
# ...unless it happens in this many active cycles in a row (a filter that is off by
# one for good is distrusted like any other misbehaving one).
FILTER_RACES_TO_DISTRUST = 3
# Weight of the last cycle in the estimate of what resolving costs.
_EWMA = 0.3
# `auto` reads actively when that is expected to cost at most this share of a full scan.
_ACTIVE_MARGIN = 0.75


@dataclass(frozen=True, slots=True)
class Plan:
    kind: PlanKind
    reason: PlanReason


@dataclass(slots=True)
class PlanState:
    """What the planner remembers of one batch; dropped with the batch's cache."""

    # Monotonic time of the last committed complete full scan; None: cold.
    last_full_at: float | None = None
    distrust_until: float = 0.0
    # Requests an active cycle spends resolving what its lists do not show (EWMA).
    resolve_requests: float = 0.0
    # Calls a look-up did not find (no longer served): left as they are, like a full
    # scan leaves a call missing from its pages, until seen again.
    gone: set[str] = field(default_factory=set)
    # External ids of the calls last seen in an active status: a call that vanishes
    # from the active lists is looked up by it.
    external_ids: dict[str, str] = field(default_factory=dict)
    # Each call's place in the batch's list (creation order) as of the last full scan.
    positions: dict[str, int] = field(default_factory=dict)
    # How much of what moved the page at the dialler's frontier explained lately.
    frontier_hits: float = 1.0
    # Calls the last cycle saw moving backwards, unconfirmed (call_id -> status seen):
    # the snapshot still has them where they were, but an active plan must look for
    # them where they were seen (a redial that ends before the second look is found
    # in its new terminal status, as a full scan would find it).
    backward: dict[str, str] = field(default_factory=dict)
    # Active cycles in a row whose filtered lists raced with their counts.
    filter_races: int = 0
    last: Plan | None = None

    def misbehaved(self, anomaly: str, now: float) -> bool:
        """Note that the status filter misbehaved this cycle (`anomaly`, a kind of
        `filtered_page_problem`); whether it is distrusted from now on (full scans
        only for `FILTER_DISTRUST_S`). A race is, only when it keeps happening."""
        if anomaly == "status_filter_race":
            self.filter_races += 1
            if self.filter_races < FILTER_RACES_TO_DISTRUST:
                return False
        self.distrust_until = now + FILTER_DISTRUST_S
        return True

    def place(self, pages: Iterable[RawPage], owners: Mapping[int, str]) -> None:
        """Note where the calls of a full scan's pages sit in the list (pages skipped
        as unchanged hold the calls they held). `owners`: the committed items'
        signatures (`ItemSignatures.owners`), which name almost every item's call
        without decoding it."""
        positions = self.positions
        for page in pages:
            first = (page.page - 1) * page.limit
            for i, raw in enumerate(page.raws):
                call_id = owners.get(hash(bytes(raw)))  # `pages.signature`, inlined
                if call_id is None:
                    e = entry(raw)
                    if e is None:
                        continue
                    call_id = e.call_id
                positions[call_id] = first + i

    def remember(self, items: Iterable[Mapping[str, Any]]) -> None:
        """Note the external ids of committed items (only active calls need one)."""
        for item in items:
            call_id = item["call_id"]
            status = normalise_status(item["status"])
            external_id = item.get("external_id")
            if status in TERMINAL_STATUSES or status == PENDING or not isinstance(external_id, str):
                self.external_ids.pop(call_id, None)
            else:
                self.external_ids[call_id] = external_id


def active_statuses(counts: Mapping[str, int]) -> list[str]:
    """The statuses an active cycle lists: the known active ones, then unknown
    non-terminal statuses the snapshot holds calls in."""
    extra = sorted(
        s
        for s, n in counts.items()
        if n > 0 and s not in TERMINAL_STATUSES and s != PENDING and s not in ACTIVE_STATUSES
    )
    return [*ACTIVE_STATUSES, *extra]


def full_cost(counts: Mapping[str, int], page_size: int) -> int:
    """Requests of a full scan: one per page."""
    return max(1, math.ceil(sum(counts.values()) / page_size))


def active_cost(counts: Mapping[str, int], page_size: int, state: PlanState) -> float:
    """Requests an active cycle is expected to make: its lists, the probe, resolving."""
    lists = sum(max(1, math.ceil(counts.get(s, 0) / page_size)) for s in active_statuses(counts))
    return lists + 1 + state.resolve_requests


def choose(
    settings: PollerSettings,
    state: PlanState,
    counts: Mapping[str, int],
    page_size: int,
    now: float,
    batch_id: str = "",
) -> Plan:
    """The plan of the next cycle of a batch (`now` on the monotonic clock).

    The periodic full scan of each batch comes up to ``jitter_ratio`` of the period
    early, by a share fixed per batch: batches seen together (a restart) do not all
    read every page in the same cycle ever after.
    """
    if settings.scan == "full":
        return Plan("full", "configured")
    if state.last_full_at is None:
        return Plan("full", "cold")
    if now < state.distrust_until:
        return Plan("full", "distrust")
    every = settings.full_scan_every_seconds
    early = settings.jitter_ratio * (zlib.crc32(batch_id.encode()) / 2**32)
    if every > 0 and now - state.last_full_at >= every * (1 - early):
        return Plan("full", "periodic")
    if settings.scan == "active":
        return Plan("active", "configured")
    # A margin: an active cycle that falls back costs both plans.
    if active_cost(counts, page_size, state) <= _ACTIVE_MARGIN * full_cost(counts, page_size):
        return Plan("active", "cheaper")
    return Plan("full", "cheaper")


def expected_requests(
    settings: PollerSettings,
    state: PlanState,
    counts: Mapping[str, int],
    page_size: int,
    now: float,
    *,
    batch_id: str = "",
    known_pages: int = 0,
) -> int:
    """What the next cycle of a batch is expected to cost (the scheduler's estimate);
    `known_pages`: the page count of the last full scan, when known."""
    plan = choose(settings, state, counts, page_size, now, batch_id)
    if plan.kind == "full":
        return known_pages or full_cost(counts, page_size)
    return math.ceil(active_cost(counts, page_size, state))


def learn(
    state: PlanState,
    plan: Plan,
    *,
    resolve_requests: int,
    full_cost: int,
    moved: int = 0,
    page_size: int = 500,
) -> None:
    """Update the cost estimate after a cycle that used `plan`.

    A full cycle tells how many calls moved (`moved`): an active cycle would have
    looked each up when few, or read the terminal lists' tails (a page more per
    `page_size` of them) when many.
    """
    if plan.kind == "active":
        spent: float = resolve_requests
    elif plan.reason == "costly":
        spent = full_cost
    else:
        spent = min(moved, len(TERMINAL_ORDER) + math.ceil(moved / page_size))
    state.resolve_requests = (1 - _EWMA) * state.resolve_requests + _EWMA * spent


def window(start: int, stop: int, max_limit: int) -> tuple[int, int]:
    """``(page, limit)`` of one page covering positions ``[start, stop)`` of a list.

    Pages are aligned to multiples of their limit, so the widest limit <= `max_limit`
    whose page holds the whole range is taken; when none does, the `max_limit` page
    holding `start`.
    """
    start = max(0, start)
    need = max(1, stop - start)
    for limit in range(max_limit, need - 1, -1):
        first = start // limit
        if (first + 1) * limit >= stop:
            return first + 1, limit
    return start // max_limit + 1, max_limit


def reaching_back(stop: int, max_limit: int) -> tuple[int, int]:
    """``(page, limit)`` of the page holding position ``stop - 1`` of a list that starts
    earliest, with a limit <= `max_limit` (the smallest such limit)."""
    last = max(0, stop - 1)
    best = (last, 1)
    for limit in range(1, max_limit + 1):
        first = last - last % limit
        if first < best[0]:
            best = (first, limit)
    first, limit = best
    return first // limit + 1, limit


def filtered_page_problem(
    page: RawPage, entries: Sequence[PageEntry], status: str, page_no: int
) -> str | None:
    """Why a page of the `status` list (its usable `entries`) cannot be what the
    filter promises, or None.

    ``status_filter_ignored``: an item of another status came back.
    ``status_filter_total``: the page's items, ``has_more`` and ``total`` disagree
    (e.g. the unfiltered total reported with filtered items).
    ``status_filter_race``: they disagree by `FILTER_RACE_ITEMS` (a call left or
    joined the list between the server's count and its query).
    """
    if any(normalise_status(e.status) != status for e in entries):
        return "status_filter_ignored"
    served = max(1, page.limit)
    got = len(page.raws)
    want = max(0, min(served, page.total - (page_no - 1) * served))
    more = page_no * served < page.total
    if got == want and page.has_more == more:
        return None
    if abs(got - want) <= FILTER_RACE_ITEMS and (
        page.has_more == more or abs(page_no * served - page.total) <= FILTER_RACE_ITEMS
    ):
        return "status_filter_race"
    return "status_filter_total"


def stored_status(states: Mapping[str, CallState]) -> Callable[[str], str | None]:
    """A call's stored status by id; for a snapshot (`CallStates`) without decoding
    the rest of the state: the active plan asks it for every call it sees."""
    if isinstance(states, CallStates):
        return states.status

    def status(call_id: str) -> str | None:
        prev = states.get(call_id)
        return prev.status if prev is not None else None

    return status


class Books:
    """Calls per status: what the snapshot and this cycle's observations say, against
    the totals the platform's lists report.

    `expected` starts from the snapshot's counts and follows every observation (a
    call seen in another status moves from its old count to its new one). For a
    list whose total is known, ``imbalance`` > 0 means calls are in it that we have
    not seen there (arrivals to find), < 0 that calls we place there have left it
    for somewhere we have not looked.
    """

    def __init__(
        self,
        states: Mapping[str, CallState],
        counts: Mapping[str, int],
        gone: Collection[str] = (),
    ) -> None:
        self._stored_status = stored_status(states)
        self.expected: Counter[str] = Counter(counts)
        self.totals: dict[str, int] = {}
        # call_id -> where this cycle places it (None: nowhere, a look-up missed it).
        self._where: dict[str, str | None] = {}
        for call_id in gone:
            self.forget(call_id)

    def status_of(self, call_id: str) -> str | None:
        if call_id in self._where:
            return self._where[call_id]
        return self._stored_status(call_id)

    def observe(self, call_id: str, status: str) -> None:
        self._move(call_id, status)

    def forget(self, call_id: str) -> None:
        """The call is served nowhere (a look-up by its external id missed it)."""
        self._move(call_id, None)

    def imbalance(self, status: str) -> int:
        return self.totals[status] - self.expected[status]

    def open_calls(
        self,
        states: Mapping[str, CallState] | None = None,
        served: Mapping[str, str] | None = None,
        confirmed: Collection[str] = (),
    ) -> int:
        """Calls expected in a non-terminal status once this cycle is committed.

        With the statuses the cycle `served` (call_id -> status): as the diff will hold
        them, where a backward move not `confirmed` yet counts as not made (it waits
        for a second look; one that will be confirmed only makes this cycle fall back
        to a full scan, never complete a batch early).
        """
        n = sum(n for s, n in self.expected.items() if s not in TERMINAL_STATUSES and n > 0)
        before = stored_status(states or {})
        for call_id, status in (served or {}).items():
            prev = before(call_id)
            if prev is not None and call_id not in confirmed and is_backward(prev, status):
                n += (prev not in TERMINAL_STATUSES) - (status not in TERMINAL_STATUSES)
        return n

    def _move(self, call_id: str, status: str | None) -> None:
        old = self.status_of(call_id)
        self._where[call_id] = status
        if old == status:
            return
        if old is not None:
            self.expected[old] -= 1
        if status is not None:
            self.expected[status] += 1
