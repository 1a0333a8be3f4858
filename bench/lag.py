"""End-to-end lag: a status change upstream -> its signed webhook at the receiver.

Three processes besides Valkey, all on this machine and all stamping ``time.time()``:

* the simulator (``bench.sim_server``, 50 batches x 200 calls), which changes call
  statuses on a timer of its own (``POST /_bench/churn``: ~1,000 status changes per
  second, round-robin over every call, so a call changes once every 10 s) and records
  when each (batch, call, status) became visible;
* the real bridge, ``callbridge run`` as a subprocess (poll interval 1 s, default
  jitter, a request budget that never throttles, one subscription);
* the receiver (``bench.receiver --record``), which records when each event arrived.

Every delivered ``call.<status>`` event is matched to the change that produced it by
(batch_id, call_id, status); lag = received - changed. The churn starts only after
every batch has had its first (silent: all calls pending) cycle.

The lag is split with two more timestamps: the first page request of that batch the
simulator received after the change (``poll``), and the event's own ``timestamp``,
which the bridge stamps once it has read every page of the cycle (``observed``):

* wait     = poll - changed      (the change waits for the batch's next cycle)
* scan     = observed - poll     (reading the pages)
* deliver  = received - observed (diff, commit, fan-out, signing, POST)

Target: p99 <= interval + 250 ms, reported as p99 / interval (<= 1.25).
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.common import (
    SECRET,
    Bridge,
    bridge_config,
    bridge_process,
    child_server,
    parse_metrics,
    quantile,
    valkey_server,
)

BATCHES = 50
CALLS = 200
RATE = 1000.0
INTERVAL_S = 1.0
TARGET_SLACK_S = 0.25
SUB = "crm"


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "mean_s": sum(values) / len(values) if values else float("nan"),
        "p50_s": quantile(values, 0.50),
        "p95_s": quantile(values, 0.95),
        "p99_s": quantile(values, 0.99),
        "max_s": max(values) if values else float("nan"),
    }


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


async def _wait_first_cycles(session: aiohttp.ClientSession, bridge: Bridge, n: int) -> float:
    """Until every batch has had one successful cycle; returns the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 120:
        async with session.get(bridge.url + "/metrics") as resp:
            samples = parse_metrics(await resp.text())
        polled = {
            labels["batch"]
            for labels, value in samples.get("callbridge_poll_cycles_total", [])
            if value > 0 and labels.get("outcome") in ("committed", "unchanged")
        }
        if len(polled) >= n:
            return time.perf_counter() - t0
        await asyncio.sleep(0.2)
    raise RuntimeError("the bridge did not poll every batch within 120 s")


def _poll_times(requests: list[list[Any]]) -> dict[str, list[float]]:
    """batch -> sorted arrival times of its page-1 requests (the start of each cycle)."""
    out: dict[str, list[float]] = {}
    for t, path_qs, _status in requests:
        parts = urlsplit(path_qs)
        if "page=1&" not in parts.query + "&" or "/call-batches/" not in parts.path:
            continue
        batch = parts.path.split("/call-batches/", 1)[1].split("/", 1)[0]
        out.setdefault(batch, []).append(float(t))
    for times in out.values():
        times.sort()
    return out


async def run(quick: bool = False, profile: bool = True) -> dict[str, Any]:
    duration = 8.0 if quick else 20.0
    started = time.perf_counter()
    with (
        valkey_server() as valkey,
        child_server(
            "bench.sim_server", ["--layout", f"{BATCHES}x{CALLS}"], "sim_server_lag"
        ) as sim,
        child_server("bench.receiver", ["--record"], "receiver_lag") as receiver,
    ):
        async with aiohttp.ClientSession() as session:
            info = await _get_json(session, sim.url + "/_bench/info")
            batch_ids: list[str] = info["batch_ids"]
            config = bridge_config(
                sim.url,
                valkey.url,
                batches=batch_ids,
                subscriptions=[
                    {"name": SUB, "url": receiver.url + "/hook", "secret": SECRET, "events": ["*"]}
                ],
                poller={"interval_seconds": INTERVAL_S},
                logging={"level": "WARNING"},
            )
            with bridge_process(config, "bridge_lag") as bridge:
                warmup_s = await _wait_first_cycles(session, bridge, len(batch_ids))
                cpu0 = (bridge.cpu_s(), sim.cpu_s(), receiver.cpu_s(), valkey.cpu_s())
                async with session.post(
                    sim.url + "/_bench/churn", params={"rate": str(RATE), "duration": str(duration)}
                ) as resp:
                    resp.raise_for_status()
                    churn_started = (await resp.json())["started_at"]
                await asyncio.sleep(duration)
                # Let the last changes be polled and delivered (or give up after 20 s).
                deadline = time.perf_counter() + 20
                while True:
                    churn = await _get_json(session, sim.url + "/_bench/churn")
                    stats = await _get_json(session, receiver.url + "/_stats")
                    done = not churn["running"] and stats["distinct_ids"] >= len(churn["changes"])
                    if done or time.perf_counter() > deadline:
                        break
                    await asyncio.sleep(0.25)
                cpu1 = (bridge.cpu_s(), sim.cpu_s(), receiver.cpu_s(), valkey.cpu_s())
                wall = max(1e-9, stats["last_at"] - churn_started)
                async with session.get(bridge.url + "/metrics") as resp:
                    metrics = parse_metrics(await resp.text())
            events = await _get_json(session, receiver.url + "/_events")
            async with session.get(
                sim.url + "/_bench/requests", params={"since": str(churn_started - 5)}
            ) as resp:
                requests = await resp.json()

    changes: dict[tuple[str, str, str], float] = {
        (b, c, s): float(t) for b, c, s, t in churn["changes"]
    }
    polls = _poll_times(requests)
    lags: list[float] = []
    wait: list[float] = []
    scan: list[float] = []
    deliver: list[float] = []
    unmatched = 0
    worst: list[tuple[float, str, float, float, float, float]] = []
    for received, etype, batch, call, status, stamp in events:
        changed = changes.get((batch, call, status))
        if changed is None or not str(etype).startswith("call."):
            unmatched += 1
            continue
        lags.append(received - changed)
        observed = _ts(stamp)
        deliver.append(received - observed)
        # The cycle that saw the change: the last one to start before it was observed.
        # (A request received a moment before the change can still see it: the
        # simulator builds the page after its churn timer has run.) The event's
        # timestamp is truncated to the ms: allow for that.
        times = polls.get(batch, [])
        i = bisect.bisect_right(times, observed + 0.001) - 1
        if i >= 0:
            wait.append(max(0.0, times[i] - changed))
            scan.append(max(0.0, observed - times[i]))
            worst.append((received - changed, batch, changed, times[i], observed, received))
    delivered_keys = {(b, c, s) for _, _, b, c, s, _ in events}
    missing = sum(1 for k in changes if k not in delivered_keys)
    summary = _summary(lags)
    p99 = summary["p99_s"]
    interval_seen = [
        v for _, v in metrics.get("callbridge_batch_poll_interval_seconds", []) if v > 0
    ]
    bridge_cpu = cpu1[0] - cpu0[0]

    def hist_mean(name: str) -> float:
        total = sum(v for _, v in metrics.get(name + "_sum", []))
        count = sum(v for _, v in metrics.get(name + "_count", []))
        return total / count if count else float("nan")

    # The bridge's own view (whole run, warm-up included), as a cross-check.
    bridge_means = {
        "poll_cycle_s": hist_mean("callbridge_poll_cycle_duration_seconds"),
        "delivery_lag_s": hist_mean("callbridge_delivery_lag_seconds"),
        "delivery_request_s": hist_mean("callbridge_delivery_duration_seconds"),
    }
    return {
        "batches": BATCHES,
        "calls_per_batch": CALLS,
        "rate_per_s": RATE,
        "duration_s": duration,
        "interval_s": INTERVAL_S,
        "jitter_ratio": 0.1,
        "warmup_s": warmup_s,
        "changes": len(changes),
        "changes_per_s": len(changes) / duration,
        "delivered_matched": len(lags),
        "unmatched_events": unmatched,
        "missing": missing,
        "lag": summary,
        "segments": {"wait": _summary(wait), "scan": _summary(scan), "deliver": _summary(deliver)},
        "ratio_p99_to_interval": p99 / INTERVAL_S,
        "target_ratio": (INTERVAL_S + TARGET_SLACK_S) / INTERVAL_S,
        "target_p99_s": INTERVAL_S + TARGET_SLACK_S,
        "effective_interval_s": {
            "min": min(interval_seen, default=float("nan")),
            "median": quantile(interval_seen, 0.5),
            "max": max(interval_seen, default=float("nan")),
        },
        "cpu_share_of_wall": {
            "bridge": bridge_cpu / wall,
            "simulator": (cpu1[1] - cpu0[1]) / wall,
            "receiver": (cpu1[2] - cpu0[2]) / wall,
            "valkey": (cpu1[3] - cpu0[3]) / wall,
        },
        "bridge_cpu_ms_per_event": 1000 * bridge_cpu / max(1, len(lags)),
        "bridge_metrics_mean": bridge_means,
        "loadavg_after": list(os.getloadavg()),
        # The 20 slowest events: times relative to the churn start.
        "slowest": [
            {
                "lag_s": w[0],
                "batch": w[1],
                "changed": w[2] - churn_started,
                "poll": w[3] - churn_started,
                "observed": w[4] - churn_started,
                "received": w[5] - churn_started,
            }
            for w in sorted(worst, reverse=True)[:20]
        ],
        # For the plot: every lag, rounded to the ms.
        "samples_ms": sorted(round(1000 * v, 1) for v in lags),
        "elapsed_s": time.perf_counter() - started,
    }
