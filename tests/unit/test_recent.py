"""Delivery stats over the last minutes, read from a real metrics registry."""

from __future__ import annotations

import math

import pytest

from callbridge.api.recent import DeliveryWindow, Totals, quantile_bound, window_stats
from callbridge.metrics import Metrics

INF = math.inf


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, {}, None),
        (0.5, {0.1: 0, 1: 0, INF: 0}, None),
        (0.5, {0.1: 10, 1: 10, INF: 10}, 0.1),
        (0.5, {0.1: 4, 1: 6, INF: 10}, 1),  # the 5th of 10 lies in (0.1, 1]
        (0.95, {0.1: 4, 1: 9, INF: 10}, None),  # beyond the largest finite bound
        (0.95, {0.1: 4, 1: 10, INF: 10}, 1),
        (0.5, {1: 5, 0.1: 5, INF: 5}, 0.1),  # unordered input
    ],
)
def test_quantile_bound(q: float, buckets: dict[float, float], expected: float | None) -> None:
    assert quantile_bound(q, buckets) == expected


def test_window_stats_are_differences() -> None:
    then = Totals({"success": 5, "retry": 5}, {0.1: 5, INF: 5}, 5, 0.25)
    now = Totals({"success": 8, "retry": 6, "dead": 1}, {0.1: 5, INF: 8}, 8, 30.25)
    stats = window_stats(now, then, 300)
    assert stats == {
        "window_s": 300,
        "attempts": 5,
        "successes": 3,
        "success_ratio": 0.6,
        "lag_count": 3,
        "lag_mean_s": 10.0,
        "lag_p50_max_s": None,  # every new observation is beyond the 0.1 s bucket
        "lag_p95_max_s": None,
    }
    assert window_stats(Totals(), None, 5)["success_ratio"] is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_forgets_what_is_older_than_the_window() -> None:
    metrics, clock = Metrics(), Clock()
    attempts = metrics.delivery_attempts
    window = DeliveryWindow(metrics.registry, window_s=60, clock=clock)
    attempts.labels("crm", "retry", "5xx").inc(10)
    metrics.delivery_lag.labels("crm").observe(0.2)
    attempts.labels("crm", "success", "2xx").inc()
    clock.now += 30
    window.sample()
    [stats] = window.stats(["crm"]).values()
    assert (stats["attempts"], stats["successes"], stats["window_s"]) == (11, 1, 30)
    assert (stats["lag_count"], stats["lag_p50_max_s"]) == (1, 0.25)

    # Over a minute later the failures have left the window; recent successes remain.
    clock.now += 70
    window.sample()
    attempts.labels("crm", "success", "2xx").inc(3)
    clock.now += 1
    stats = window.stats(["crm", "idle"])
    assert stats["crm"]["attempts"] == 3
    assert stats["crm"]["success_ratio"] == 1.0
    # Measured from the newest sample at least a window old (taken at +30 s).
    assert stats["crm"]["window_s"] == 71
    assert stats["idle"]["attempts"] == 0
    assert stats["idle"]["success_ratio"] is None
