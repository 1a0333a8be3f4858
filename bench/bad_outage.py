"""A receiver that goes away mid-campaign and comes back (issue 25, the outage target).

The turbulence scenario's shape (`tests.support.scenario`: 1,200 calls in 2 batches, a
1 s poll interval, a receiver failing 20 % of first attempts with 500, 429 or a 3 s
hang, the subscription's timeout 2 s, ``max_in_flight`` 64), in processes: Valkey, the
campaign simulator (`bench.campaign`, 2 x 600 calls, 12 lines per batch, speed 1:
about 2.5 minutes of dialling; no platform faults, the receiving side is on trial),
the receiver (`bench.bad_receiver`, every signature verified) and ``callbridge run``
(defaults otherwise: breaker probes every 1 s doubling to 5 s). An on-call
subscription (``events: ["subscription.*", "delivery.dead_lettered"]``) points at the
receiver's control server, which stays up.

`OUTAGE_AT_S` after the campaign starts, the receiver goes down:

* ``refuse_60``: it refuses connections (no listening socket, open ones closed) for
  60 s;
* ``503_60``: it answers every request 503 for 60 s (those count as the ids' first
  attempts at the receiver: the 20 % rule then applies to none of them);
* ``refuse_600`` (``--long``, alone): connections refused for 10 minutes; the campaign
  ends during the outage.

After the campaign and the outage, the run waits until every final status arrived and
the queue is empty (at most `SETTLE_MAX_S`), then runs the ground-truth checker
(``interval_s`` 1). **Missed** events: those whose first 2xx came after the outage began
and that the bridge had observed (the event's ``timestamp``) before the receiver came
back. For each, the time from the receiver's return to its arrival: target, all of
them within 15 s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from bench.bad_common import (
    MetricsSampler,
    bad_receiver,
    crm_subscription,
    get_json,
    oncall_subscription,
    summary,
)
from bench.common import bridge_config, bridge_process, child_server, valkey_server
from bench.lag import _ts as iso_ts
from bench.planner import _finals, _ground_truth, _missing, _wait_first_cycles

BATCHES = 2
CALLS = 600
LINES = 12
SPEED = 1.0
INTERVAL_S = 1.0
OUTAGE_AT_S = 30.0
SETTLE_MAX_S = 120.0
TARGET_AFTER_RETURN_S = 15.0
RUNS = {"refuse_60": ("refuse", 60.0), "503_60": ("503", 60.0)}
LONG_RUNS = {"refuse_600": ("refuse", 600.0)}
RECEIVER_ARGS = ["--fail-share", "0.2", "--fail-kinds", "500=1,429=1,hang=1"]
RECEIVER_ARGS += ["--hang-seconds", "3"]


async def _settled(
    session: aiohttp.ClientSession,
    receiver_url: str,
    sampler: MetricsSampler,
    finals: dict[tuple[str, str], tuple[str, float]],
    since: float,
) -> tuple[list[list[Any]], float]:
    while True:
        events = await get_json(session, receiver_url + "/_events")
        depth = sampler.last().get("depth", {})
        queued = sum(depth.get(k, 0) for k in ("ready", "scheduled", "waiting", "inflight"))
        now = time.time()
        if (not _missing(finals, events) and queued == 0) or now > since + SETTLE_MAX_S:
            return events, now
        await asyncio.sleep(1.0)


def missed_after_return(
    events: list[list[Any]], start: float, end: float
) -> tuple[dict[str, float], list[float]]:
    """The events the outage held back (see the module doc) and, per event, the seconds
    from the receiver's return to its arrival."""
    after = sorted(
        float(received) - end
        for received, _type, *_, stamp in events
        if float(received) >= start and stamp and iso_ts(stamp) < end
    )
    figures = summary(after)
    figures["first_s"] = after[0] if after else float("nan")
    figures["over_target"] = sum(1 for a in after if a > TARGET_AFTER_RETURN_S)
    return figures, after


async def run_one(label: str, mode: str, seconds: float, calls: int) -> dict[str, Any]:
    started = time.perf_counter()
    sim_args = ["--batches", str(BATCHES), "--calls", str(calls), "--lines", str(LINES)]
    sim_args += ["--speed", str(SPEED)]
    with (
        valkey_server() as valkey,
        child_server("bench.campaign", sim_args, f"campaign_bad_outage_{label}") as sim,
        bad_receiver(RECEIVER_ARGS, f"receiver_bad_outage_{label}") as receiver,
    ):
        async with aiohttp.ClientSession() as session:
            info = await get_json(session, sim.url + "/_campaign/info")
            batch_ids: list[str] = info["batch_ids"]
            config = bridge_config(
                sim.url,
                valkey.url,
                batches=batch_ids,
                subscriptions=[
                    crm_subscription(receiver, timeout_seconds=2, max_in_flight=64),
                    oncall_subscription(receiver),
                ],
                upstream={"max_requests_per_second": 10.0, "timeout_seconds": 10.0},
                poller={"interval_seconds": INTERVAL_S},
                logging={"level": "INFO"},
            )
            with bridge_process(config, f"bridge_bad_outage_{label}") as bridge:
                await _wait_first_cycles(session, bridge, len(batch_ids))
                sampler = MetricsSampler(bridge, session)
                sampler.start()
                async with session.post(sim.url + "/_campaign/start") as resp:
                    t0 = float((await resp.json())["started_at"])
                await asyncio.sleep(max(0.0, t0 + OUTAGE_AT_S - time.time()))
                params = {"mode": mode, "seconds": str(seconds)}
                async with session.post(receiver.url + "/_outage", params=params) as resp:
                    resp.raise_for_status()
                while True:
                    state = await get_json(session, sim.url + "/_campaign/state")
                    windows = await get_json(session, receiver.url + "/_outage")
                    if state["finished"] and windows[0][2] is not None:
                        break
                    await asyncio.sleep(1.0)
                _, start, end = windows[0]
                t_end = float(state["finished_at"])
                truth = await get_json(session, sim.url + "/_campaign/truth")
                finals = _finals(truth)
                events, settled = await _settled(
                    session, receiver.url, sampler, finals, max(t_end, end)
                )
                await sampler.stop()
            report = await _ground_truth(
                session, sim.url, receiver.url, batch_ids, interval_s=INTERVAL_S
            )
            stats = await get_json(session, receiver.url + "/_stats")
            ops = await get_json(session, receiver.url + "/_ops")
            requests = await get_json(session, receiver.url + "/_requests", since=str(t0))
    missed, after = missed_after_return(events, start, end)
    # Ids the receiver was sent but never answered 2xx by the end (still waiting for a
    # later retry): missed events that did not arrive at all.
    answered_ok = {r[4] for r in requests if r[2] == "200"}
    undelivered = sorted({r[4] for r in requests if r[2] != "200"} - answered_ok)
    missed["undelivered_ids"] = len(undelivered)
    first_request = min((r[0] for r in requests if r[0] >= end), default=float("nan"))
    opened = [r["t"] for r in sampler.rows if r["t"] >= start and r["breaker"] != "closed"]
    closed = [r["t"] for r in sampler.rows if r["t"] >= end and r["breaker"] == "closed"]
    last = sampler.last()
    return {
        "label": label,
        "mode": mode,
        "outage_s": seconds,
        "outage": {"start": start, "end": end, "start_after_campaign_start_s": start - t0},
        "campaign_s": t_end - t0,
        "settled_after_s": settled - max(t_end, end),
        "events": len(events),
        "checker": {**report.figures(), "batch_completed": report.batch_completed},
        "missed": missed,
        "missed_after_return_s": [round(a, 3) for a in after],
        "undelivered_ids": undelivered[:20],
        "first_request_after_return_s": first_request - end,
        # The breaker gauge is refreshed every 2 s by the bridge.
        "breaker_seen_open_after_s": (opened[0] - start) if opened else None,
        "breaker_seen_closed_after_return_s": (closed[0] - end) if closed else None,
        "promoted": last.get("promoted", 0.0),
        "limit_changes": last.get("changes", {}),
        "detached": last.get("detached", 0.0),
        "attempts": last.get("attempts", {}),
        "receiver_stats": stats,
        "ops": [[t, kind, data, ok] for t, kind, data, ok in ops],
        "ops_relative": [
            [round(t - (start if t < end else end), 1), f"{kind} ({'in' if t < end else 'after'})"]
            for t, kind, _data, _ok in ops
        ],
        "ops_verified": all(ok for *_, ok in ops),
        "series": sampler.series(t0),
        "answers_per_s": _answers_per_s(requests, t0),
        "t0": t0,
        "elapsed_s": time.perf_counter() - started,
    }


def _answers_per_s(requests: list[list[Any]], t0: float) -> dict[str, list[float]]:
    """2xx and other answers per second of arrival, since `t0`."""
    if not requests:
        return {"ok": [], "failed": []}
    n = int(max(r[0] for r in requests) - t0) + 1
    ok, failed = [0.0] * n, [0.0] * n
    for arrival, _answered, answer, *_ in requests:
        i = int(arrival - t0)
        if answer == "200":
            ok[i] += 1
        else:
            failed[i] += 1
    return {"ok": ok, "failed": failed}


async def run(quick: bool = False, long: bool = False) -> dict[str, Any]:
    calls = 300 if quick else CALLS
    runs = LONG_RUNS if long else RUNS
    if quick:  # shorter outages, same shape
        runs = {k: (mode, 120.0 if long else 20.0) for k, (mode, _s) in runs.items()}
    out = {
        label: await run_one(label, mode, seconds, calls) for label, (mode, seconds) in runs.items()
    }
    result = {
        "batches": BATCHES,
        "calls_per_batch": calls,
        "lines": LINES,
        "speed": SPEED,
        "interval_s": INTERVAL_S,
        "outage_at_s": OUTAGE_AT_S,
        "runs": out,
        "target_after_return_s": TARGET_AFTER_RETURN_S,
    }
    plot(result, "bad_days_outage_long.png" if long else "bad_days_outage.png")
    return result


def plot(result: dict[str, Any], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import IMG

    runs = result["runs"]
    fig, axes = plt.subplots(
        3,
        len(runs),
        figsize=(6.5 * len(runs), 9),
        constrained_layout=True,
        squeeze=False,
        sharex="col",
    )
    for col, (label, r) in enumerate(runs.items()):
        start = r["outage"]["start"] - r["t0"]
        end = r["outage"]["end"] - r["t0"]
        a = r["answers_per_s"]
        xs = list(range(len(a["ok"])))
        axes[0][col].plot(xs, a["ok"], label="2xx / s", color="tab:green")
        axes[0][col].plot(xs, a["failed"], label="failed / s", color="tab:red", alpha=0.7)
        s = r["series"]
        axes[1][col].step(s["t_s"], s["limit"], where="post", label="concurrency limit")
        axes[1][col].fill_between(
            s["t_s"],
            0,
            [64 * v for v in s["breaker_open"]],
            step="post",
            alpha=0.2,
            color="tab:orange",
            label="breaker open / half-open",
        )
        axes[2][col].plot(s["t_s"], s["backlog"], label="queued deliveries")
        for ax in axes[:, col]:
            ax.axvspan(start, end, color="grey", alpha=0.15)
            ax.legend(loc="upper left")
        m = r["missed"]
        axes[0][col].set_title(
            f"{label}: {m['n']:,} missed events arrived\n{m['p99_s']:.1f} s (p99), "
            f"{m['max_s']:.1f} s (max) after the return",
            fontsize=10,
        )
        axes[2][col].set_xlabel("seconds since the campaign started (grey: the outage)")
    axes[0][0].set_ylabel("receiver answers / s")
    axes[1][0].set_ylabel("requests at once")
    axes[2][0].set_ylabel("deliveries")
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / name, dpi=100)
    plt.close(fig)
