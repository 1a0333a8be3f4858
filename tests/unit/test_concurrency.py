"""The adaptive concurrency limit (pure): it follows what a receiver absorbs.

A closed-loop model of a receiver with `capacity` requests served at once in
`service_s` each (more queue: latency grows with the excess) stands in for the
receiver; the limiter sees one sample per answer, as the deliverer feeds it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from callbridge.config import SubscriptionSettings
from callbridge.deliver.concurrency import AdaptiveLimit
from callbridge.deliver.lane import Lane
from tests.support.settings import SECRET


def latency_at(limit: int, capacity: int, service_s: float) -> float:
    # `limit` requests in flight, `capacity` served at once: each waits its turn.
    return service_s * max(1.0, limit / capacity)


def run(limiter: AdaptiveLimit, capacity: int, service_s: float, answers: int) -> list[int]:
    """Feed `answers` answers at the limit's concurrency; the limit each was sent at."""
    now, seen = 0.0, []
    for _ in range(answers):
        limit = limiter.limit
        latency = latency_at(limit, capacity, service_s)
        now += latency / limit  # answers arrive at the throughput min(limit, capacity)/service
        limiter.observe(latency_s=latency, ok=True, overloaded=False, now=now)
        seen.append(limit)
    return seen


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(min_value=2, max_value=40),
    service_s=st.floats(min_value=0.05, max_value=1.0),
)
def test_a_receiver_of_limited_capacity_is_not_pushed_past_it(
    capacity: int, service_s: float
) -> None:
    limiter = AdaptiveLimit(ceiling=64)
    limits = run(limiter, capacity, service_s, 4000)
    settled = limits[2000:]
    # Latency within 2x the unloaded latency...
    assert max(latency_at(n, capacity, service_s) for n in settled) <= 2 * service_s
    # ...while answers come at >= 0.8x the receiver's capacity (capacity / service_s).
    took_s = sum(latency_at(n, capacity, service_s) / n for n in settled)
    assert len(settled) / took_s >= 0.8 * capacity / service_s


def test_a_fast_receiver_keeps_the_ceiling() -> None:
    limiter = AdaptiveLimit(ceiling=64)
    limits = run(limiter, capacity=1000, service_s=0.02, answers=2000)
    assert set(limits[200:]) == {64}  # once ramped up (doubling from 1)


def test_a_receiver_answering_in_microseconds_is_not_throttled_for_a_queue_of_them() -> None:
    # 1 ms unloaded, 4 ms at 64 in flight (the bridge's own event loop adds that much):
    # within the absolute headroom, not a receiver at its capacity.
    limiter = AdaptiveLimit(ceiling=64)
    limits = run(limiter, capacity=16, service_s=0.001, answers=3000)
    assert min(limits[1000:]) == 64


def test_a_few_hung_requests_do_not_move_the_limit() -> None:
    # 2 % time out at 5 s, 5 % fail fast: the median and the error share stay put.
    limiter = AdaptiveLimit(ceiling=64)
    run(limiter, capacity=1000, service_s=0.05, answers=500)
    assert limiter.limit == 64
    now = 100.0
    for i in range(5000):
        now += 0.001
        if i % 50 == 0:
            limiter.observe(latency_s=5.0, ok=False, overloaded=True, now=now)
        elif i % 20 == 0:
            limiter.observe(latency_s=0.001, ok=False, overloaded=True, now=now)
        else:
            limiter.observe(latency_s=0.05, ok=True, overloaded=False, now=now)
    assert limiter.limit == 64
    assert limiter.reason == "increase"  # it never moved since the ramp


def test_a_receiver_that_answers_503_under_load_is_backed_off_and_ramped_again() -> None:
    limiter = AdaptiveLimit(ceiling=64)
    run(limiter, capacity=1000, service_s=0.05, answers=500)
    assert limiter.limit == 64
    now = 100.0
    for _ in range(400):
        now += 0.001
        limiter.observe(latency_s=0.05, ok=False, overloaded=True, now=now)
    assert limiter.limit <= 16
    assert limiter.reason == "errors"
    for _ in range(3000):
        now += 0.001
        limiter.observe(latency_s=0.05, ok=True, overloaded=False, now=now)
    assert limiter.limit == 64
    assert limiter.reason == "increase"


def test_start_and_restart_double_from_the_floor() -> None:
    limiter = AdaptiveLimit(ceiling=64)
    assert limiter.limit == 1
    limits = run(limiter, capacity=1000, service_s=0.02, answers=200)
    # Doubling: 1 -> 2 -> ... -> 64, a window (>= 8 answers) each.
    assert sorted(set(limits)) == [1, 2, 4, 8, 16, 32, 64]
    limiter.restart()
    assert limiter.limit == 1
    assert run(limiter, capacity=1000, service_s=0.02, answers=200)[-1] == 64


def test_detach_waits_for_the_receiver_to_be_known_and_far_outlived() -> None:
    limiter = AdaptiveLimit(ceiling=8)
    assert limiter.detach_after_s(timeout_s=5) is None  # nothing known yet
    run(limiter, capacity=100, service_s=0.02, answers=50)
    assert limiter.detach_after_s(timeout_s=5) == 0.5  # 8 x 20 ms is under the floor
    slow = AdaptiveLimit(ceiling=8)
    run(slow, capacity=100, service_s=0.2, answers=50)
    assert slow.detach_after_s(timeout_s=5) == 8 * 0.2
    assert slow.detach_after_s(timeout_s=1) is None  # the timeout comes first


def test_no_detach_while_the_receiver_is_slow_across_the_board() -> None:
    limiter = AdaptiveLimit(ceiling=8)
    run(limiter, capacity=100, service_s=0.02, answers=50)
    now = 100.0
    for _ in range(16):
        now += 0.1
        limiter.observe(latency_s=0.3, ok=True, overloaded=False, now=now)
    assert limiter.detach_after_s(timeout_s=5) is None


def test_a_cut_limit_is_held_while_work_is_due() -> None:
    # 8 in flight, 4 of them just written, the limit cut to 2: the step claims none
    # back (6 are still in flight), and never more than the limit allows.
    sub = SubscriptionSettings.model_validate(
        {"name": "crm", "url": "http://127.0.0.1:1/h", "secret": SECRET, "max_in_flight": 64}
    )
    lane = Lane.of(sub)
    lane.inflight, lane.limiter.value = 8, 2
    assert lane.claimable(held=4, free=100) == (0, 0)
    lane.inflight = 4
    assert lane.claimable(held=4, free=100) == (2, 0)
    lane.inflight, lane.limiter.value = 1, 16
    assert lane.claimable(held=1, free=100) == (1, 15)
    assert lane.claimable(held=1, free=3) == (1, 3)


def test_detached_slots_let_a_short_claim_try_again() -> None:
    # A claim came back short (the endpoint paced by a 429: half its slots, all held by
    # hung requests): the loop stopped claiming until its idle period passed, with a
    # backlog due. Detaching those requests frees their slots here and in the claim
    # script: the lane may claim again at once.
    sub = SubscriptionSettings.model_validate(
        {"name": "crm", "url": "http://127.0.0.1:1/h", "secret": SECRET, "timeout_seconds": 5}
    )
    lane = Lane.of(sub)
    run(lane.limiter, capacity=100, service_s=0.02, answers=50)
    lane.start(("evt_1", "t"), now=10.0)
    lane.maybe_due = False
    assert lane.detach_due(now=10.2)[0] == 0  # not yet: nothing changes
    assert lane.maybe_due is False
    assert lane.detach_due(now=10.6) == (1, None)
    assert lane.maybe_due is True
