"""The ground-truth checker, on hand-built truths and deliveries: each rule can fail."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from callbridge.simulator import StatusSpan
from tests.support.flaky import HookRequest
from tests.support.turbulence import check, percentile, visible_s

B = "sched_1"
T = 1.0  # poll interval: required = visible for 2 s


def spans(call: str, *steps: tuple[str, float], end: float | None = None) -> list[StatusSpan]:
    """Back-to-back spans of one call from (status, start) pairs; the last one is open
    unless `end` is given."""
    out = []
    for (status, start), nxt in itertools.zip_longest(steps, steps[1:]):
        out.append(StatusSpan(B, call, status, start, nxt[1] if nxt else end))
    return out


_ids = itertools.count()


def event(
    call: str,
    status: str,
    seq: int,
    previous: str | None,
    at: float,
    *,
    ok: bool = True,
    body_extra: dict[str, Any] | None = None,
    event_id: str | None = None,
    **data: Any,
) -> HookRequest:
    doc = {
        "type": f"call.{status}",
        "timestamp": "2026-11-28T10:00:00.000Z",
        "data": {
            "batch_id": B,
            "call_id": call,
            "status": status,
            "previous_status": previous,
            "sequence": seq,
            **data,
        },
        **(body_extra or {}),
    }
    eid = event_id or f"evt_{next(_ids)}"
    return HookRequest(eid, orjson.dumps(doc), at, 1, "200" if ok else "500", True, {})


def completed(at: float, total: int, n: int = 0) -> HookRequest:
    doc = {"type": "batch.completed", "data": {"batch_id": B, "total": total, "counts": {}}}
    return HookRequest(f"evt_batch_{n}", orjson.dumps(doc), at, 1, "200", True, {})


# A call: pending 0-1, queued 1-4 (3 s: required), ringing 4-4.5 (short),
# answered 4.5-4.7 (short), in_progress 4.7-10 (required), completed from 10 (final).
CALL = spans(
    "c1",
    ("pending", 0),
    ("queued", 1),
    ("ringing", 4),
    ("answered", 4.5),
    ("in_progress", 4.7),
    ("completed", 10),
)


def perfect() -> list[HookRequest]:
    return [
        event("c1", "queued", 1, "pending", 1.5),
        event("c1", "in_progress", 2, "queued", 5.5, skipped_statuses=["ringing", "answered"]),
        event("c1", "completed", 3, "in_progress", 10.8),
        completed(11.0, 1),
    ]


def test_a_perfect_delivery_passes_with_its_lags() -> None:
    report = check(CALL, perfect(), poll_interval_s=T, now=20)
    assert report.ok, str(report)
    assert report.required == 3
    assert sorted(report.lags_s) == pytest.approx([0.5, 0.8, 0.8])
    assert report.batch_completed == {B: (1, 1, 1)}
    assert "missing=0" in str(report)


def test_a_required_status_not_delivered_is_missing_a_short_one_is_not() -> None:
    requests = [r for r in perfect() if r.payload()["data"].get("status") != "queued"]
    # Repair the chain so only the missing status is reported.
    requests[0] = event("c1", "in_progress", 2, "pending", 5.5)
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert [(m.status, m.final) for m in report.missing] == [("queued", False)]
    assert not report.broken_chains
    # With a 2 s interval the queued of 3 s is no longer required.
    assert check(CALL, requests, poll_interval_s=2, now=20).missing == []


def test_a_final_status_is_always_required() -> None:
    requests = perfect()[:2]
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert [(m.status, m.final) for m in report.missing] == [("completed", True)]
    assert report.batch_completed == {B: (0, 1, 1)}
    assert not report.batch_completed_exact


def test_time_inside_an_outage_is_not_visible() -> None:
    assert visible_s(1, 4, [(0, 2), (3, 3.5)]) == pytest.approx(1.5)
    assert visible_s(1, 4, [(0, 2), (1.5, 2.5)]) == pytest.approx(1.5)
    requests = [r for r in perfect() if r.payload()["data"].get("status") != "queued"]
    requests[0] = event("c1", "in_progress", 2, "pending", 5.5)
    report = check(CALL, requests, poll_interval_s=T, outages=[(1.5, 3.0)], now=20)
    assert report.missing == []


def test_a_status_the_call_never_had_is_invented() -> None:
    requests = [*perfect(), event("c1", "busy", 4, "completed", 12)]
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert [p.detail for p in report.invented] == ["busy (seq 4)"]
    # An event of a status the call reaches only after the event arrived: invented too.
    early = [event("c1", "completed", 1, "pending", 2.0)]
    assert len(check(CALL, early, poll_interval_s=T, now=20).invented) == 1


def test_a_real_status_in_an_impossible_order_is_out_of_order() -> None:
    requests = [*perfect()[:3], event("c1", "queued", 4, "completed", 12)]
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert [p.detail for p in report.out_of_order] == ["queued (seq 4)"]
    assert report.invented == []


def test_previous_status_must_chain() -> None:
    requests = perfect()
    requests[2] = event("c1", "completed", 3, "answered", 10.8)
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert [p.detail for p in report.broken_chains] == [
        "answered -> completed, last delivered in_progress"
    ]
    # The first event may say null (first sight) as well as pending.
    requests = perfect()
    requests[0] = event("c1", "queued", 1, None, 1.5, initial=True)
    assert check(CALL, requests, poll_interval_s=T, now=20).ok


# A redial whose no_answer lasted 0.5 s: queued, ringing, no_answer, queued, ringing again.
REDIAL = spans(
    "c2",
    ("pending", 0),
    ("queued", 1),
    ("ringing", 4),
    ("no_answer", 7),
    ("queued", 7.5),
    ("ringing", 8),
    ("busy", 12),
)


def test_a_missed_terminal_marker_is_honoured_and_checked() -> None:
    requests = [
        event("c2", "queued", 1, "pending", 1.5),
        event("c2", "ringing", 2, "queued", 4.5),
        event("c2", "ringing", 3, "ringing", 9.0, missed_terminal=True),
        event("c2", "busy", 4, "ringing", 12.5),
        completed(12.6, 1),
    ]
    report = check(REDIAL, requests, poll_interval_s=T, now=20)
    assert report.ok, str(report)
    assert report.missed_terminal_markers == 1
    # The same marker where no terminal status lies between: false.
    false = [
        event("c2", "queued", 1, "pending", 1.5),
        event("c2", "ringing", 2, "queued", 4.5, missed_terminal=True),
    ]
    report = check(REDIAL, false, poll_interval_s=T, now=20)
    assert len(report.false_markers) == 1


def test_the_swallowed_redial_of_issue_11_is_caught() -> None:
    # Issue 11: stored ringing; the next scans show queued (for 2.5 s), then ringing
    # again. The bridge dropped queued as a stale copy and never learnt of the redial:
    # the placement credits one ringing; queued and the other ringing are missing.
    truth = spans(
        "c2",
        ("pending", 0),
        ("queued", 1),
        ("ringing", 4),
        ("no_answer", 7),
        ("queued", 7.5),
        ("ringing", 10),
        ("busy", 14),
    )
    requests = [
        event("c2", "queued", 1, "pending", 1.5),
        event("c2", "ringing", 2, "queued", 4.5),
        event("c2", "busy", 3, "ringing", 14.5),
    ]
    report = check(truth, requests, poll_interval_s=T, now=20)
    assert sorted(m.status for m in report.missing) == ["queued", "ringing"]
    assert report.invented == report.out_of_order == []


def test_a_repeat_no_poller_can_tell_apart_is_one_occurrence() -> None:
    # ringing, then no_answer and queued for 0.5 s each, then ringing again: a poller
    # every second may see one unbroken ringing. One call.ringing covers both.
    requests = [
        event("c2", "queued", 1, "pending", 1.5),
        event("c2", "ringing", 2, "queued", 4.5),
        event("c2", "busy", 3, "ringing", 12.5),
        completed(12.6, 1),
    ]
    report = check(REDIAL, requests, poll_interval_s=T, now=20)
    assert report.ok, str(report)
    assert report.required_by_status == {"queued": 1, "ringing": 1, "busy": 1}
    # Nor is a second call.ringing (a bridge that caught the redial) out of order.
    caught = [
        *requests[:2],
        event("c2", "ringing", 3, "ringing", 9.0, missed_terminal=True),
        event("c2", "busy", 4, "ringing", 12.5),
        completed(12.6, 1),
    ]
    assert check(REDIAL, caught, poll_interval_s=T, now=20).ok


def test_an_id_with_two_bodies_and_a_sequence_claimed_twice() -> None:
    requests = perfect()
    requests.append(
        event("c1", "queued", 1, "pending", 2.5, event_id=requests[0].id, body_extra={"x": 1})
    )
    requests.append(event("c1", "queued", 1, "pending", 1.6))
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert report.two_bodies == [requests[0].id]
    assert len(report.same_sequence) == 1


def test_an_id_never_answered_2xx_is_undelivered() -> None:
    requests = [*perfect(), event("c1", "completed", 9, "in_progress", 12, ok=False)]
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert len(report.undelivered_ids) == 1
    assert not report.ok


def test_missing_statuses_attempted_or_not() -> None:
    # in_progress was attempted (a 500, never retried to success); completed never was.
    requests = [
        event("c1", "queued", 1, "pending", 1.5),
        event("c1", "in_progress", 2, "queued", 5.5, ok=False),
        completed(11.0, 1),
    ]
    report = check(CALL, requests, poll_interval_s=T, now=20)
    assert [m.status for m in report.missing] == ["in_progress", "completed"]
    assert report.missing_unattempted == 1


def test_batch_completed_counts_each_visible_completion_and_reopen() -> None:
    two = spans("c2", ("pending", 0), ("queued", 1), ("completed", 3))

    def one(*steps: tuple[str, float]) -> list[StatusSpan]:
        return spans("c1", ("pending", 0), ("queued", 1), ("no_answer", 2), *steps)

    # All terminal over [3, 6) (3 s: required), reopened for 3 s, complete again from 9.
    truth = one(("queued", 6), ("busy", 9)) + two
    assert check(truth, [], poll_interval_s=T, now=20).batch_completed == {B: (0, 2, 2)}
    with_events = [completed(3.5, 2, 0), completed(9.5, 2, 1)]
    assert check(truth, with_events, poll_interval_s=T, now=20).batch_completed_exact
    wrong_total = [completed(3.5, 5, 0), completed(9.5, 2, 1)]
    assert not check(truth, wrong_total, poll_interval_s=T, now=20).batch_completed_exact
    # A completion of 1.5 s (3 to 4.5), then a long reopen: it may be reported or not.
    short = one(("queued", 4.5), ("busy", 7)) + two
    assert check(short, [], poll_interval_s=T, now=20).batch_completed == {B: (0, 1, 2)}
    # A reopen of 1.5 s (6 to 7.5): the two completions may look like one.
    blip = one(("queued", 6), ("busy", 7.5)) + two
    report = check(blip, [completed(3.5, 2, 0)], poll_interval_s=T, now=20)
    assert report.batch_completed == {B: (1, 1, 2)}
    assert report.batch_completed_exact


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50, 99, 100,
    )  # fmt: skip
    assert percentile([3.0], 50) == 3.0


def test_with_the_served_record_required_means_served_twice() -> None:
    # ringing was visible 3 s but the bridge's scans got it once (a failed scan, a
    # page missing it): not required. queued, served twice in 1.5 s: required.
    truth = spans("c1", ("pending", 0), ("ringing", 1), ("queued", 4), ("ringing", 5.5))
    served = {(B, "c1"): [0.5, 2.0, 4.2, 5.0, 6.0, 7.0]}
    got = [event("c1", "ringing", 2, "queued", 7.1)]
    report = check(truth, got, poll_interval_s=T, now=10.0, served=served)
    assert [(m.status, m.start) for m in report.missing] == [("queued", 4)]
    got = [event("c1", "queued", 1, "pending", 5.2), event("c1", "ringing", 2, "queued", 7.1)]
    report = check(truth, got, poll_interval_s=T, now=10.0, served=served)
    assert report.missing == []
