"""Delivery health over the last minutes, computed from this replica's own metrics.

``callbridge_delivery_attempts_total`` and the ``callbridge_delivery_lag_seconds``
histogram only grow, so what happened in the last `window_s` seconds is the current
value minus a sample taken `window_s` ago - what Prometheus's ``increase()`` does,
in-process, so the console needs no Prometheus server. Samples are taken every
`every_s` seconds by `run` (and on each read); the oldest kept is the newest one
at least `window_s` old, so the reported window is exact once the process has run
that long (and says how long it really covers before).

It is this replica's view: in a fleet, each replica reports the deliveries it made.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

_ATTEMPTS = "callbridge_delivery_attempts"
_LAG = "callbridge_delivery_lag_seconds"
# Sample names: reading only these skips the registry's per-batch series (which grow
# with the number of batches) - 40 ms less per read with 1,000 batches.
_SAMPLES = (f"{_ATTEMPTS}_total", f"{_LAG}_bucket", f"{_LAG}_count", f"{_LAG}_sum")
_MIN_GAP_S = 1.0


@dataclass(slots=True)
class Totals:
    """One subscription's counters at one instant."""

    attempts: dict[str, float] = field(default_factory=dict)  # outcome -> count
    lag_buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    lag_count: float = 0.0
    lag_sum: float = 0.0


def read_totals(registry: CollectorRegistry) -> dict[str, Totals]:
    """The delivery counters of every subscription, read as a scrape would."""
    out: dict[str, Totals] = defaultdict(Totals)
    for family in registry.restricted_registry(_SAMPLES).collect():
        if family.name == _ATTEMPTS:
            for s in family.samples:
                if s.name.endswith("_total"):
                    t = out[s.labels["subscription"]]
                    outcome = s.labels["outcome"]
                    t.attempts[outcome] = t.attempts.get(outcome, 0.0) + s.value
        elif family.name == _LAG:
            for s in family.samples:
                t = out[s.labels["subscription"]]
                if s.name.endswith("_bucket"):
                    t.lag_buckets[float(s.labels["le"])] = s.value
                elif s.name.endswith("_count"):
                    t.lag_count = s.value
                elif s.name.endswith("_sum"):
                    t.lag_sum = s.value
    return dict(out)


def quantile_bound(q: float, buckets: dict[float, float]) -> float | None:
    """The upper bound of the histogram bucket holding the `q` quantile (le -> count).

    A bound, not an estimate: "p95 at most 0.25 s" stays true whatever the spread inside
    the bucket (interpolating puts a 5 ms median at 50 ms in a 0-100 ms bucket). None
    without observations, or when the quantile lies beyond the largest finite bound.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    for le in bounds:
        if buckets[le] >= rank:
            return None if math.isinf(le) else le
    return None


def window_stats(now: Totals, then: Totals | None, window_s: float) -> dict[str, Any]:
    """Attempts, success ratio and lag between two samples of one subscription."""
    then = then or Totals()
    attempts = {k: v - then.attempts.get(k, 0.0) for k, v in now.attempts.items()}
    total = sum(attempts.values())
    successes = attempts.get("success", 0.0)
    lag_count = now.lag_count - then.lag_count
    buckets = {le: n - then.lag_buckets.get(le, 0.0) for le, n in now.lag_buckets.items()}
    return {
        "window_s": round(window_s, 1),
        "attempts": int(total),
        "successes": int(successes),
        "success_ratio": successes / total if total else None,
        "lag_count": int(lag_count),
        "lag_mean_s": (now.lag_sum - then.lag_sum) / lag_count if lag_count else None,
        "lag_p50_max_s": quantile_bound(0.5, buckets),
        "lag_p95_max_s": quantile_bound(0.95, buckets),
    }


class DeliveryWindow:
    """Per-subscription delivery stats over the last `window_s` seconds (this replica)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        window_s: float = 300.0,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.every_s = every_s
        self._registry = registry
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, Totals]]] = deque(
            [(clock(), read_totals(registry))]
        )

    def sample(self) -> dict[str, Totals]:
        """Read the counters; keep them as a sample unless the last one is very recent."""
        now, totals = self._clock(), read_totals(self._registry)
        if now - self._samples[-1][0] >= _MIN_GAP_S:
            self._samples.append((now, totals))
        # Keep one sample at or before the window's start, none older.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        return totals

    def stats(self, subscriptions: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Stats of each of `subscriptions` over the window (zeros when it made no attempt)."""
        current = self.sample()
        since, then = self._samples[0]
        covered = self._clock() - since
        return {
            sub: window_stats(current.get(sub, Totals()), then.get(sub), covered)
            for sub in subscriptions
        }

    async def run(self) -> None:
        """Sample every `every_s` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.every_s)
            self.sample()


RECENT: web.AppKey[DeliveryWindow] = web.AppKey("recent_deliveries", DeliveryWindow)
