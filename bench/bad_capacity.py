"""A receiver whose capacity is limited, fed a backlog (issue 25, second target).

Processes: Valkey, the simulator (``bench.sim_server``, one batch of `EVENTS` calls),
the receiver (``bench.bad_receiver --capacity 8 --service-ms 50``: 8 requests served at
once, 50 ms each, the rest queued in arrival order, every signature verified) and
``callbridge run`` (one subscription at its defaults: ``max_in_flight`` 64, adaptive
concurrency, timeout 15 s; poll interval 1 s, a budget that never throttles).

In the same run, from the bench process and with the bridge not yet started:

* **unloaded latency**: `PROBES` signed requests one at a time; the receiver's own
  time from arrival to answer, median (about the service time);
* **ceiling**: `CEILING_REQUESTS` signed requests from N coroutines at once: what
  the receiver really serves per second (the nominal capacity is N / service time).

Then two backlogs of `EVENTS` events each, as the bridge really gets them:

* ``cold``: every call is switched to ``in_progress`` before the bridge starts; its
  first cycle commits `EVENTS` initial events at once, and the adaptive limit starts
  from 1 (slow start);
* ``warm``: once delivered, every call is switched to ``completed``: `EVENTS` more,
  with the limit where the first backlog left it.

Per backlog, at the receiver: latency (arrival to answer, queueing included) p50/p99 of
the requests that arrived while it drained, and the drain rate (events / (last answer
- first arrival)). Targets: p99 within 2x the unloaded latency, drain >= 0.8x the
nominal capacity. The limit (``/metrics`` every 0.5 s) is plotted with the receiver's
queue and latency over time (``docs/img/bad_days_capacity.png``).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Any

import aiohttp
import orjson

from bench.bad_common import (
    SUB,
    MetricsSampler,
    bad_receiver,
    crm_subscription,
    get_json,
    signed_post_args,
    summary,
)
from bench.common import bridge_config, bridge_process, child_server, quantile, valkey_server

EVENTS = 5_000
CAPACITY = 8
SERVICE_MS = 50.0
PROBES = 40
CEILING_REQUESTS = 800
INTERVAL_S = 1.0
TARGET_LATENCY_RATIO = 2.0
TARGET_DRAIN_RATIO = 0.8
BIN_S = 0.5


def _body(event_id: str) -> bytes:
    return orjson.dumps({"type": "bench.probe", "data": {"id": event_id}})


async def _post(session: aiohttp.ClientSession, url: str, event_id: str) -> None:
    async with session.post(url, **signed_post_args(event_id, _body(event_id))) as resp:
        await resp.read()
        resp.raise_for_status()


async def unloaded(session: aiohttp.ClientSession, hook_url: str, rows_url: str) -> dict[str, Any]:
    """`PROBES` requests one at a time: the receiver's latency, unloaded."""
    since = time.time()
    for i in range(PROBES):
        await _post(session, hook_url, f"probe_unloaded_{i}")
    rows = await get_json(session, rows_url, since=str(since))
    return summary([answered - arrival for arrival, answered, *_ in rows])


async def ceiling(session: aiohttp.ClientSession, hook_url: str, rows_url: str) -> dict[str, Any]:
    """`CEILING_REQUESTS` requests from `CAPACITY` coroutines: what the receiver serves."""
    since = time.time()
    ids = iter(range(CEILING_REQUESTS))

    async def worker() -> None:
        for i in ids:
            await _post(session, hook_url, f"probe_ceiling_{i}")

    await asyncio.gather(*(worker() for _ in range(CAPACITY)))
    rows = await get_json(session, rows_url, since=str(since))
    span = max(r[1] for r in rows) - min(r[0] for r in rows)
    return {
        "requests": len(rows),
        "per_s": len(rows) / span,
        "latency": summary([answered - arrival for arrival, answered, *_ in rows]),
    }


async def _wait_delivered(
    session: aiohttp.ClientSession, url: str, etype: str, n: int, limit_s: float
) -> float:
    """Until `n` events of type `etype` were answered 2xx; returns the last arrival."""
    deadline = time.monotonic() + limit_s
    while True:
        events = await get_json(session, url + "/_events")
        arrived = [float(e[0]) for e in events if e[1] == etype]
        if len(arrived) >= n:
            return max(arrived)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(arrived)} of {n} {etype} events in {limit_s:.0f} s")
        await asyncio.sleep(0.5)


def _phase(rows: list[list[Any]], start: float, n: int, sampler: MetricsSampler) -> dict[str, Any]:
    """The requests of one backlog: those that arrived from `start` until the answer
    to the last of its `n` events."""
    mine = [r for r in rows if r[0] >= start and not str(r[4]).startswith("probe_")]
    ok = sorted((r for r in mine if r[2] == "200"), key=lambda r: r[1])[:n]
    first, last = min(r[0] for r in mine), ok[-1][1]
    window = [r for r in mine if r[0] <= last]
    latencies = [answered - arrival for arrival, answered, *_ in window]
    return {
        "events": len(ok),
        "requests": len(window),
        "answers": {a: sum(1 for r in window if r[2] == a) for a in {r[2] for r in window}},
        "first_arrival": first,
        "last_answer": last,
        "drain_s": last - first,
        "drain_per_s": len(ok) / (last - first),
        "latency": summary(latencies),
        "queued_at_arrival": {
            "p50": quantile([r[5] for r in window], 0.5),
            "p99": quantile([r[5] for r in window], 0.99),
            "max": max((r[5] for r in window), default=0),
        },
        "limit": sampler.limit_stats(first, last),
    }


async def run(quick: bool = False) -> dict[str, Any]:
    events = 1_500 if quick else EVENTS
    started = time.perf_counter()
    receiver_args = ["--capacity", str(CAPACITY), "--service-ms", str(SERVICE_MS)]
    with (
        valkey_server() as valkey,
        child_server("bench.sim_server", ["--layout", f"1x{events}"], "sim_bad_capacity") as sim,
        bad_receiver(receiver_args, "receiver_bad_capacity") as receiver,
    ):
        rows_url = receiver.url + "/_requests"
        async with aiohttp.ClientSession() as session:
            base = await unloaded(session, receiver.hook_url, rows_url)
            top = await ceiling(session, receiver.hook_url, rows_url)
            info = await get_json(session, sim.url + "/_bench/info")
            batch_id = info["batch_id"]
            async with session.post(
                sim.url + "/_bench/switch", params={"status": "in_progress"}
            ) as resp:
                resp.raise_for_status()
            config = bridge_config(
                sim.url,
                valkey.url,
                batches=[batch_id],
                subscriptions=[crm_subscription(receiver)],
                poller={"interval_seconds": INTERVAL_S},
                logging={"level": "INFO"},
            )
            cold_start = time.time()
            with bridge_process(config, "bridge_bad_capacity") as bridge:
                sampler = MetricsSampler(bridge, session)
                sampler.start()
                await _wait_delivered(session, receiver.url, "call.in_progress", events, 600)
                await asyncio.sleep(3.0)  # the limit as the backlog left it, on the plot
                async with session.post(
                    sim.url + "/_bench/switch", params={"status": "completed"}
                ) as resp:
                    resp.raise_for_status()
                    warm_start = float((await resp.json())["at"])
                await _wait_delivered(session, receiver.url, "call.completed", events, 600)
                await asyncio.sleep(2.0)
                await sampler.stop()
            rows = await get_json(session, rows_url, since=str(cold_start))
    warm_rows = [r for r in rows if r[0] >= warm_start]
    cold_rows = [r for r in rows if r[0] < warm_start]
    last = sampler.last()
    result = {
        "capacity": CAPACITY,
        "service_ms": SERVICE_MS,
        "nominal_per_s": CAPACITY / (SERVICE_MS / 1000),
        "unloaded": base,
        "ceiling": top,
        "phases": {
            "cold": _phase(cold_rows, cold_start, events, sampler),
            "warm": _phase(warm_rows, warm_start, events, sampler),
        },
        "limit_changes": last.get("changes", {}),
        "detached": last.get("detached", 0.0),
        "attempts": last.get("attempts", {}),
        "bridge_mean_request_s": last.get("duration_sum", 0.0)
        / max(1.0, last.get("duration_count", 0.0)),
        "target_latency_ratio": TARGET_LATENCY_RATIO,
        "target_drain_ratio": TARGET_DRAIN_RATIO,
        "series": sampler.series(cold_start),
        "receiver_series": _receiver_series(rows, cold_start),
        "subscription": SUB,
        "elapsed_s": time.perf_counter() - started,
    }
    plot(result)
    return result


def _receiver_series(rows: list[list[Any]], t0: float) -> dict[str, list[float]]:
    """Per `BIN_S` of arrivals: latency p50/p99, answers, requests in the receiver."""
    if not rows:
        return {}
    end = max(r[1] for r in rows)
    bins = int((end - t0) / BIN_S) + 1
    lat: list[list[float]] = [[] for _ in range(bins)]
    done = [0] * bins
    for arrival, answered, *_ in rows:
        lat[int((arrival - t0) / BIN_S)].append(answered - arrival)
        done[int((answered - t0) / BIN_S)] += 1
    # In the receiver (served or queued) at each bin's start.
    starts = sorted(r[0] for r in rows)
    ends = sorted(r[1] for r in rows)
    inside = []
    for i in range(bins):
        t = t0 + i * BIN_S
        inside.append(_count_le(starts, t) - _count_le(ends, t))
    return {
        "t_s": [i * BIN_S for i in range(bins)],
        "p50_s": [quantile(v, 0.5) if v else float("nan") for v in lat],
        "p99_s": [quantile(v, 0.99) if v else float("nan") for v in lat],
        "answers_per_s": [n / BIN_S for n in done],
        "inside": inside,
    }


def _count_le(values: list[float], t: float) -> int:
    return bisect.bisect_right(values, t)


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import IMG

    s, rs = result["series"], result["receiver_series"]
    unloaded_ms = 1000 * result["unloaded"]["p50_s"]
    n = result["capacity"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True, constrained_layout=True)
    axes[0].step(s["t_s"], s["limit"], where="post", label="adaptive limit (bridge /metrics)")
    axes[0].plot(rs["t_s"], rs["inside"], alpha=0.6, label="requests in the receiver")
    axes[0].axhline(n, color="black", linestyle=":", label=f"receiver capacity N = {n}")
    axes[0].set_ylabel("requests at once")
    axes[0].legend(loc="upper right")
    axes[1].plot(rs["t_s"], [1000 * v for v in rs["p50_s"]], label="latency p50")
    axes[1].plot(rs["t_s"], [1000 * v for v in rs["p99_s"]], label="latency p99")
    axes[1].axhline(unloaded_ms, color="black", linestyle=":", label="unloaded")
    axes[1].axhline(2 * unloaded_ms, color="tab:red", linestyle=":", label="2x unloaded")
    axes[1].set_ylabel(f"receiver latency per {BIN_S} s (ms)")
    axes[1].set_ylim(0, max(4 * unloaded_ms, 10))
    axes[1].legend(loc="upper right")
    axes[2].plot(rs["t_s"], rs["answers_per_s"], label="answers/s")
    axes[2].axhline(result["nominal_per_s"], color="black", linestyle=":", label="capacity")
    axes[2].axhline(
        0.8 * result["nominal_per_s"], color="tab:red", linestyle=":", label="0.8x capacity"
    )
    axes[2].set_ylabel("answers / s")
    axes[2].set_xlabel("seconds since the bridge started")
    axes[2].legend(loc="lower right")
    cold, warm = result["phases"]["cold"], result["phases"]["warm"]
    axes[0].set_title(
        f"Receiver serving {n} at once in {result['service_ms']:.0f} ms; backlogs of "
        f"{cold['events']:,} events: cold {cold['drain_per_s']:.0f}/s, "
        f"warm {warm['drain_per_s']:.0f}/s (capacity {result['nominal_per_s']:.0f}/s)"
    )
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "bad_days_capacity.png", dpi=100)
    plt.close(fig)
