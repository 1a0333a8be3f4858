"""The planner's pure parts: which plan, what it costs, the books, windows, page checks."""

from __future__ import annotations

import dataclasses

import msgspec
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callbridge.config import PollerSettings
from callbridge.poll.pages import RawPage
from callbridge.poll.planner import (
    FILTER_DISTRUST_S,
    Books,
    Plan,
    PlanState,
    active_cost,
    active_statuses,
    choose,
    expected_requests,
    filtered_page_problem,
    full_cost,
    learn,
    reaching_back,
    window,
)
from callbridge.store.callstate import CallState, Fingerprint

FP = Fingerprint((0,) * 7)
# A 20,000-call campaign: 40 full pages at 500; a few dozen calls on the lines.
CAMPAIGN = {"pending": 12_000, "queued": 20, "ringing": 30, "in_progress": 40, "completed": 7910}


def poller(**kw: object) -> PollerSettings:
    return PollerSettings.model_validate(kw)


def warm(**kw: object) -> PlanState:
    return PlanState(last_full_at=100.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "state", "counts", "now", "plan"),
    [
        (poller(scan="full"), warm(), CAMPAIGN, 101.0, Plan("full", "configured")),
        (poller(), PlanState(), CAMPAIGN, 101.0, Plan("full", "cold")),
        (poller(), warm(distrust_until=200.0), CAMPAIGN, 101.0, Plan("full", "distrust")),
        (poller(), warm(), CAMPAIGN, 400.0, Plan("full", "periodic")),
        (poller(full_scan_every_seconds=0), warm(), CAMPAIGN, 1e9, Plan("active", "cheaper")),
        (poller(), warm(), CAMPAIGN, 101.0, Plan("active", "cheaper")),
        # 300 calls fit one page: a full scan is one request.
        (poller(), warm(), {"pending": 200, "queued": 100}, 101.0, Plan("full", "cheaper")),
        # Resolving was expensive lately (a burst of moves): full until that fades.
        (poller(), warm(resolve_requests=40.0), CAMPAIGN, 101.0, Plan("full", "cheaper")),
        (poller(scan="active"), warm(), {"pending": 5}, 101.0, Plan("active", "configured")),
        (poller(scan="active"), PlanState(), {"pending": 5}, 101.0, Plan("full", "cold")),
    ],
)
def test_choose(
    settings: PollerSettings, state: PlanState, counts: dict[str, int], now: float, plan: Plan
) -> None:
    assert choose(settings, state, counts, 500, now) == plan


def test_costs_and_the_schedulers_estimate() -> None:
    assert full_cost(CAMPAIGN, 500) == 40
    assert full_cost({}, 500) == 1
    # Four active lists of one page each, plus the pending probe.
    assert active_cost(CAMPAIGN, 500, warm()) == 5
    assert active_cost(CAMPAIGN, 500, warm(resolve_requests=3.5)) == 8.5
    assert active_statuses({"voicemail": 2, "completed": 3, "pending": 1}) == [
        "queued",
        "ringing",
        "answered",
        "in_progress",
        "voicemail",
    ]
    p = poller()
    assert expected_requests(p, warm(), CAMPAIGN, 500, 101.0) == 5
    assert expected_requests(p, PlanState(), CAMPAIGN, 500, 101.0) == 40
    assert expected_requests(p, PlanState(), CAMPAIGN, 500, 101.0, known_pages=41) == 41


def test_learning_what_resolving_costs() -> None:
    state = warm()
    learn(state, Plan("active", "cheaper"), resolve_requests=10, full_cost=40)
    assert state.resolve_requests == pytest.approx(3.0)
    learn(state, Plan("full", "costly"), resolve_requests=0, full_cost=40)
    assert state.resolve_requests == pytest.approx(0.7 * 3 + 0.3 * 40)
    high = state.resolve_requests
    for _ in range(10):
        learn(state, Plan("full", "cheaper"), resolve_requests=0, full_cost=40, moved=3)
    # Full cycles where few calls moved (three look-ups) let it fade: active again.
    assert state.resolve_requests < high / 4
    assert state.resolve_requests == pytest.approx(3, abs=0.5)
    for _ in range(10):
        learn(state, Plan("full", "periodic"), resolve_requests=0, full_cost=40, moved=2000)
    # 2,000 calls moved a cycle: five terminal tails and four pages more of them.
    assert state.resolve_requests == pytest.approx(9, abs=0.5)


@settings(max_examples=500)
@given(st.integers(0, 100_000), st.integers(1, 500), st.integers(20, 500))
def test_window_covers_the_range_when_one_page_can(start: int, length: int, max_limit: int) -> None:
    page, limit = window(start, start + length, max_limit)
    assert page >= 1
    assert 1 <= limit <= max_limit
    first, end = (page - 1) * limit, page * limit
    if length <= max_limit // 3:
        # Some aligned page of a limit in [max_limit/3, max_limit] holds the range.
        assert first <= start
        assert end >= start + length
    else:
        # At least it starts the range.
        assert first <= start < end


@settings(max_examples=300)
@given(st.integers(1, 100_000), st.integers(1, 500))
def test_reaching_back_holds_the_end_and_starts_earliest(stop: int, max_limit: int) -> None:
    page_no, limit = reaching_back(stop, max_limit)
    assert 1 <= limit <= max_limit
    first = (page_no - 1) * limit
    assert first <= stop - 1 < first + limit
    # No page of any limit up to max_limit holding stop - 1 starts earlier.
    assert first == min(stop - 1 - (stop - 1) % n for n in range(1, max_limit + 1))


@settings(max_examples=300)
@given(st.integers(1_000, 100_000))
def test_reaching_back_reaches_far_in_pages_of_500(stop: int) -> None:
    # Two thirds of a page back at least (95 % of one on average, up to 100,000 calls).
    page_no, limit = reaching_back(stop, 500)
    assert stop - (page_no - 1) * limit >= 333


def page(items: list[dict[str, object]], *, total: int, page_no: int, limit: int) -> RawPage:
    return RawPage(
        raws=[msgspec.Raw(orjson.dumps(i)) for i in items],
        total=total,
        page=page_no,
        limit=limit,
        has_more=page_no * limit < total,
    )


def items(status: str, n: int) -> list[dict[str, object]]:
    return [{"call_id": f"c{i}", "status": status} for i in range(n)]


@pytest.mark.parametrize(
    ("raw", "status", "page_no", "problem"),
    [
        (page(items("queued", 3), total=3, page_no=1, limit=5), "queued", 1, None),
        (page(items("queued", 5), total=12, page_no=2, limit=5), "queued", 2, None),
        (page(items("queued", 2), total=12, page_no=3, limit=5), "queued", 3, None),
        (page([], total=12, page_no=4, limit=5), "queued", 4, None),
        (page(items(" Queued", 1), total=1, page_no=1, limit=5), "queued", 1, None),
        # The filter ignored: other statuses come back.
        (
            page(items("pending", 5), total=900, page_no=1, limit=5),
            "queued",
            1,
            "status_filter_ignored",
        ),
        # Filtered items, unfiltered total.
        (
            page(items("queued", 3), total=900, page_no=1, limit=5),
            "queued",
            1,
            "status_filter_total",
        ),
        (
            dataclasses.replace(
                page(items("queued", 2), total=2, page_no=1, limit=5), has_more=True
            ),
            "queued",
            1,
            "status_filter_total",
        ),
        # A call left (or joined) the list between the count and the query: a race.
        (page(items("queued", 2), total=3, page_no=1, limit=5), "queued", 1, "status_filter_race"),
        (page(items("queued", 4), total=3, page_no=1, limit=5), "queued", 1, "status_filter_race"),
        (page(items("queued", 3), total=9, page_no=2, limit=5), "queued", 2, "status_filter_race"),
        # The last page of 10 (has_more false): one more call joined after the count.
        (
            dataclasses.replace(
                page(items("queued", 5), total=11, page_no=2, limit=5), has_more=False
            ),
            "queued",
            2,
            "status_filter_race",
        ),
    ],
)
def test_filtered_page_problems(
    raw: RawPage, status: str, page_no: int, problem: str | None
) -> None:
    assert filtered_page_problem(raw, raw.entries, status, page_no) == problem


def test_a_race_is_distrusted_only_when_it_keeps_happening() -> None:
    state = PlanState()
    assert not state.misbehaved("status_filter_race", 10.0)
    assert not state.misbehaved("status_filter_race", 11.0)
    assert state.distrust_until == 0.0
    assert state.misbehaved("status_filter_race", 12.0)
    assert state.distrust_until == 12.0 + FILTER_DISTRUST_S
    assert PlanState().misbehaved("status_filter_total", 1.0)


def test_books_follow_observations() -> None:
    states = {
        "a": CallState("pending", 0, FP),
        "b": CallState("ringing", 1, FP),
        "c": CallState("completed", 3, FP),
        "d": CallState("queued", 1, FP),
    }
    counts = {"pending": 1, "ringing": 1, "completed": 1, "queued": 1}
    books = Books(states, counts, gone={"d"})
    assert books.expected["queued"] == 0  # d is served nowhere
    books.observe("a", "queued")
    books.observe("a", "queued")  # seen twice: counted once
    books.observe("b", "no_answer")
    books.observe("new", "ringing")
    books.totals.update({"pending": 0, "queued": 1, "no_answer": 2, "ringing": 1})
    assert books.imbalance("pending") == 0
    assert books.imbalance("queued") == 0
    assert books.imbalance("ringing") == 0
    # One no_answer call we have not seen yet.
    assert books.imbalance("no_answer") == 1
    assert books.open_calls() == 2
    books.forget("a")
    assert books.expected["queued"] == 0
    books.observe("d", "queued")  # seen again after all
    assert books.expected["queued"] == 1


def test_plan_state_remembers_external_ids_of_active_calls_and_positions() -> None:
    state = PlanState()
    state.remember(
        [
            {"call_id": "a", "status": "ringing", "external_id": "101"},
            {"call_id": "b", "status": "pending", "external_id": "102"},
            {"call_id": "c", "status": "queued", "external_id": None},
        ]
    )
    assert state.external_ids == {"a": "101"}
    state.remember([{"call_id": "a", "status": "completed", "external_id": "101"}])
    assert state.external_ids == {}
    state.place([page(items("pending", 3), total=9, page_no=2, limit=3)], {})
    assert state.positions == {"c0": 3, "c1": 4, "c2": 5}


def test_periodic_full_scans_of_batches_spread_over_the_jitter() -> None:
    p = poller(full_scan_every_seconds=300, jitter_ratio=0.1)
    due = {}
    for batch_id in (f"sched_{i}" for i in range(20)):
        t = next(
            t
            for t in range(200, 401)
            if choose(p, warm(), CAMPAIGN, 500, 100.0 + t, batch_id).reason == "periodic"
        )
        due[batch_id] = t
    # Each batch between 270 s and 300 s after its last full scan, not all at once.
    assert all(270 <= t <= 300 for t in due.values()), due
    assert len(set(due.values())) > 10


def test_open_calls_as_the_diff_will_hold_them() -> None:
    states = {
        "r": CallState("completed", 3, FP),  # seen queued: a redial, or a stale copy
        "s": CallState("ringing", 2, FP),  # seen queued: back between active statuses
        "t": CallState("pending", 0, FP),
    }
    books = Books(states, {"completed": 1, "ringing": 1, "pending": 1})
    served = {"r": "queued", "s": "queued", "t": "cancelled"}
    for call_id, status in served.items():
        books.observe(call_id, status)
    assert books.open_calls() == 2
    # Unconfirmed, the redial leaves the batch finished as far as the diff goes.
    assert books.open_calls(states, served) == 1
    assert books.open_calls(states, served, confirmed={"r"}) == 2
