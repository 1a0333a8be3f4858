"""The fleet-wide request budget under a load far beyond it.

100 batches of 100 calls, ``page_size`` 50 (2 pages per cycle), poll interval 1 s:
the bridge would need ~200 requests/s, and ``max_requests_per_second`` is 20. The
real bridge (``callbridge run`` subprocess, so `Poller.run` and the Redis GCRA
limiter exactly as deployed) polls the simulator process, whose request log gives
the arrival time of every request (``GET /_bench/requests``).

40 of the batches are finished before the bridge starts (every call ``completed``).
``quiet_period_seconds`` is set to 1 ms so a batch seen completed is at once
``lingering`` (as if it had completed long ago; linger interval 60 s), while the
other 60 stay ``active``. The first round (every batch once, ~10 s at 20 req/s) is
a warm-up; the window measured is the ``duration`` after it. Figures:

* max requests in any 1-second window (sliding, over the whole run, warm-up
  included): must be <= the budget;
* mean requests/s in the window / the budget: should be close to 1 (the limiter
  keeps 2.5% headroom, so ~0.975);
* the effective poll interval per batch: ``callbridge_batch_poll_interval_seconds``
  from the bridge's ``/metrics`` (the last interval of each batch), and every
  interval between two cycle starts (page-1 requests) in the window, for active
  and finished batches apart; compared with the interval the budget allows,
  active batches x pages x 1.025 / budget.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.common import (
    bridge_config,
    bridge_process,
    child_server,
    parse_metrics,
    quantile,
    valkey_server,
)

BATCHES = 100
CALLS = 100
PAGE_SIZE = 50
FINISHED = 40
BUDGET = 20.0
INTERVAL_S = 1.0
WARMUP_S = 11.0
TARGET_MEAN_RATIO = 0.9


def _dist(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "min": min(values, default=float("nan")),
        "median": quantile(values, 0.5),
        "max": max(values, default=float("nan")),
    }


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """Most arrivals in any half-open window [t, t + width) (sliding over arrivals)."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + width:
            j += 1
        best = max(best, j - i)
    return best


async def run(quick: bool = False, profile: bool = True) -> dict[str, Any]:
    duration = 8.0 if quick else 20.0
    started = time.perf_counter()
    with (
        valkey_server() as valkey,
        child_server(
            "bench.sim_server", ["--layout", f"{BATCHES}x{CALLS}"], "sim_server_budget"
        ) as sim,
    ):
        async with aiohttp.ClientSession() as session:
            async with session.get(sim.url + "/_bench/info") as resp:
                batch_ids: list[str] = (await resp.json())["batch_ids"]
            finished = batch_ids[:FINISHED]
            active = batch_ids[FINISHED:]
            params = [("batch", b) for b in finished]
            async with session.post(sim.url + "/_bench/finish", params=params) as resp:
                resp.raise_for_status()
            config = bridge_config(
                sim.url,
                valkey.url,
                batches=batch_ids,
                upstream={"page_size": PAGE_SIZE, "max_requests_per_second": BUDGET},
                poller={
                    "interval_seconds": INTERVAL_S,
                    "quiet_period_seconds": 0.001,
                    "linger_interval_seconds": 60,
                    "linger_seconds": 3600,
                },
                logging={"level": "WARNING"},
            )
            t_start = time.time()
            with bridge_process(config, "bridge_budget") as bridge:
                await asyncio.sleep(WARMUP_S)
                w0 = time.time()
                await asyncio.sleep(duration)
                w1 = time.time()
                async with session.get(bridge.url + "/metrics") as resp:
                    metrics = parse_metrics(await resp.text())
            async with session.get(
                sim.url + "/_bench/requests", params={"since": str(t_start)}
            ) as resp:
                log = await resp.json()

    upstream: list[tuple[float, str, int]] = []
    for t, path_qs, status in log:
        parts = urlsplit(path_qs)
        if "/call-batches/" in parts.path:
            batch = parts.path.split("/call-batches/", 1)[1].split("/", 1)[0]
            upstream.append((float(t), batch if "page=1&" in parts.query + "&" else "", status))
    times = [t for t, _, _ in upstream]
    in_window = [t for t in times if w0 <= t < w1]
    starts: dict[str, list[float]] = {}
    for t, batch, _ in upstream:
        if batch:
            starts.setdefault(batch, []).append(t)
    finished_set = set(finished)
    intervals: dict[str, list[float]] = {"active": [], "finished": []}
    cycles: dict[str, list[int]] = {"active": [], "finished": []}
    for batch in batch_ids:
        ts = sorted(starts.get(batch, []))
        group = "finished" if batch in finished_set else "active"
        cycles[group].append(sum(1 for t in ts if w0 <= t < w1))
        intervals[group] += [b - a for a, b in itertools.pairwise(ts) if w0 <= b < w1]
    gauge = {
        labels["batch"]: v
        for labels, v in metrics.get("callbridge_batch_poll_interval_seconds", [])
    }
    gauge_by = {
        "active": [gauge[b] for b in active if b in gauge],
        "finished": [gauge[b] for b in finished if b in gauge],
    }
    # The bridge's own count up to the scrape at the end of the window, against
    # the simulator's count of the same span (a consistency check).
    bridge_requests = sum(v for _, v in metrics.get("callbridge_upstream_requests_total", []))
    sim_requests_until_scrape = sum(1 for t in times if t < w1)
    pages = -(-CALLS // PAGE_SIZE)
    expected_active = len(active) * pages * 1.025 / BUDGET
    max_1s = max_in_window(times)
    mean_rps = len(in_window) / (w1 - w0)
    active_median = quantile(intervals["active"], 0.5)
    return {
        "batches": BATCHES,
        "calls_per_batch": CALLS,
        "page_size": PAGE_SIZE,
        "pages_per_cycle": pages,
        "finished_batches": FINISHED,
        "budget_rps": BUDGET,
        "interval_s": INTERVAL_S,
        "demand_rps": BATCHES * pages / INTERVAL_S,
        "warmup_s": WARMUP_S,
        "window_s": w1 - w0,
        "requests_total": len(times),
        "bridge_requests_until_scrape": bridge_requests,
        "sim_requests_until_scrape": sim_requests_until_scrape,
        "non_200": sum(1 for _, _, s in upstream if s != 200),
        "max_in_any_1s": max_1s,
        "max_ratio": max_1s / BUDGET,
        "mean_rps": mean_rps,
        "mean_ratio": mean_rps / BUDGET,
        "target_mean_ratio": TARGET_MEAN_RATIO,
        "cycles_in_window": {g: _dist([float(c) for c in v]) for g, v in cycles.items()},
        "intervals_in_window_s": {g: _dist(v) for g, v in intervals.items()},
        "metrics_interval_s": {g: _dist(v) for g, v in gauge_by.items()},
        "expected_active_interval_s": expected_active,
        "active_interval_ratio": active_median / expected_active,
        "samples": {
            "arrivals_rel_s": [round(t - t_start, 4) for t in times],
            "window": [w0 - t_start, w1 - t_start],
        },
        "elapsed_s": time.perf_counter() - started,
    }
