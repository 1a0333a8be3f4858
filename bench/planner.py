"""The scan planner over a whole campaign: upstream requests and lag, full scans against auto.

Four runs of the same campaign (``bench.campaign``: 10 batches x 20,000 calls, every
call pending, then dialled on 60 lines per batch, ended, a share redialled once),
each with its own Valkey, simulator process, recording receiver and ``callbridge run``
subprocess (poll interval 2 s, page size 500, ``max_concurrent_batches`` 10):

* ``roomy``: a request budget of 400/s, which full scans (10 x 40 pages every 2 s =
  200/s) do not exhaust; ``scan: full`` then ``scan: auto``. Target: auto makes >= 3x
  fewer upstream requests over the campaign.
* ``tight``: a budget of 60/s, so a full round (400 pages) takes 6.7 s, more than 3
  intervals; ``scan: full`` then ``scan: auto``. Target: auto's lag p99 (status change
  -> webhook received) >= 2.5x lower.

The campaign starts once every batch had its first (cold, full) cycle and runs on
wall-clock time (``--speed`` 0.25: statuses last 0.05-0.8 s, so most calls start and
end between two polls; a run takes ~5 min). Requests are counted by the simulator
(every List Batch Calls request it received: whole pages, status lists and probes,
``external_id`` look-ups) from the campaign start until DRAIN_S after its end. Lag:
each delivered ``call.*`` event is matched to the moment its call last entered the
event's status (ground truth from the campaign). Missing: calls whose final status
(ground truth) never arrived after the call entered it; and the ground-truth checker of
the fidelity issue (`tests.support.turbulence.check`, run per batch over the campaign's
`Simulator.spans`, when the simulator's answers carried each call, and every event the
receiver got) with issue 11's rule: every final status and every status the platform
served to the bridge twice must arrive; it also counts invented and out-of-order
statuses, broken ``previous_status`` chains and inexact ``batch.completed``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from typing import Any

import aiohttp
import orjson

from bench.common import (
    IMG,
    SECRET,
    Bridge,
    bridge_config,
    bridge_process,
    child_server,
    parse_metrics,
    quantile,
    valkey_server,
)
from bench.explain import explain, late_events, matched_events, print_traces, reasons
from callbridge.simulator import StatusSpan
from tests.support.flaky import HookRequest
from tests.support.turbulence import Report, check

BATCHES = 10
CALLS = 20_000
LINES = 60
SPEED = 0.25
INTERVAL_S = 2.0
PAGE_SIZE = 500
BUDGETS = {"roomy": 400.0, "tight": 60.0}
DRAIN_S = 20.0
# Give up waiting for the last final statuses this long after the campaign ended.
SETTLE_MAX_S = 120.0
BIN_S = 15.0
TARGET_REQUEST_RATIO = 3.0
TARGET_LAG_RATIO = 2.5


async def _get_json(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as resp:
        resp.raise_for_status()
        return await resp.json(content_type=None)


async def _wait_first_cycles(session: aiohttp.ClientSession, bridge: Bridge, n: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        async with session.get(bridge.url + "/metrics") as resp:
            samples = parse_metrics(await resp.text())
        polled = {
            labels["batch"]
            for labels, value in samples.get("callbridge_poll_cycles_total", [])
            if value > 0 and labels.get("outcome") in ("committed", "unchanged")
        }
        if len(polled) >= n:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError("the bridge did not poll every batch in time")


async def _wait_finished(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """The campaign's state once every call has its final status."""
    for _ in range(3600):
        state: dict[str, Any] = await _get_json(session, url + "/_campaign/state")
        if state["finished"]:
            return state
        await asyncio.sleep(1.0)
    raise RuntimeError("the campaign did not finish within an hour")


def _finals(truth: list[list[Any]]) -> dict[tuple[str, str], tuple[str, float]]:
    out: dict[tuple[str, str], tuple[str, float]] = {}
    for batch, call, status, t in truth:
        out[(batch, call)] = (status, float(t))
    return out


def _missing(
    finals: dict[tuple[str, str], tuple[str, float]], events: list[list[Any]]
) -> list[tuple[str, str]]:
    """Calls whose final status never arrived after the call entered it."""
    arrived: dict[tuple[str, str, str], float] = {}
    for received, etype, batch, call, status, _stamp in events:
        if str(etype).startswith("call."):
            key = (batch, call, status)
            arrived[key] = max(arrived.get(key, 0.0), float(received))
    return [key for key, (status, t) in finals.items() if arrived.get((*key, status), 0.0) < t]


def _lags(truth: list[list[Any]], events: list[list[Any]]) -> list[tuple[float, float]]:
    """(change time, lag) of each delivered call event, matched to the last time its call
    entered the event's status before the event was received."""
    return [(t, received - t) for *_, t, received in matched_events(truth, events)]


def _merge(total: Report, part: Report) -> None:
    """Add one batch's report to the campaign's."""
    for f in dataclasses.fields(Report):
        mine, theirs = getattr(total, f.name), getattr(part, f.name)
        if isinstance(mine, list):
            mine.extend(theirs)
        elif f.name == "required_by_status":
            for status, n in theirs.items():
                mine[status] = mine.get(status, 0) + n
        elif isinstance(mine, dict):
            mine.update(theirs)
        elif isinstance(mine, int) and f.name != "poll_interval_s":
            setattr(total, f.name, mine + theirs)


async def _ground_truth(
    session: aiohttp.ClientSession,
    sim_url: str,
    receiver_url: str,
    batch_ids: list[str],
    interval_s: float = INTERVAL_S,
) -> Report:
    """`tests.support.turbulence.check` over the whole campaign, one batch at a time
    (`interval_s`: the bridge's poll interval, which the checker's rule for
    batch.completed reads)."""
    hooks = await _get_json(session, receiver_url + "/_hooks")
    by_batch: dict[str, list[HookRequest]] = defaultdict(list)
    for event_id, received, doc in hooks:
        request = HookRequest(event_id, orjson.dumps(doc), float(received), 1, "200", True, {})
        by_batch[doc["data"].get("batch_id")].append(request)
    del hooks
    total = Report(interval_s)
    for batch_id in batch_ids:
        raw = await _get_json(session, sim_url + "/_campaign/spans", batch=batch_id)
        spans = [StatusSpan(batch_id, c, status, a, b) for c, status, a, b in raw]
        answers = await _get_json(session, sim_url + "/_campaign/served", batch=batch_id)
        served = {(batch_id, c): times for c, times in answers}
        requests = by_batch.pop(batch_id, [])
        now = time.time()
        part = check(spans, requests, poll_interval_s=interval_s, now=now, served=served)
        _merge(total, part)
    # Events of batches the campaign never had: the checker counts them invented.
    _merge(
        total,
        check(
            [],
            [r for rs in by_batch.values() for r in rs],
            poll_interval_s=interval_s,
            now=time.time(),
        ),
    )
    return total


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_s": quantile(values, 0.5),
        "p95_s": quantile(values, 0.95),
        "p99_s": quantile(values, 0.99),
        "max_s": max(values, default=float("nan")),
    }


async def run_one(scan: str, budget_name: str, calls: int, batches: int) -> dict[str, Any]:
    label = f"{budget_name}_{scan}"
    started = time.perf_counter()
    sim_args = ["--batches", str(batches), "--calls", str(calls), "--lines", str(LINES)]
    sim_args += ["--speed", str(SPEED)]
    with (
        valkey_server() as valkey,
        child_server("bench.campaign", sim_args, f"campaign_{label}") as sim,
        child_server("bench.receiver", ["--record"], f"receiver_planner_{label}") as receiver,
    ):
        async with aiohttp.ClientSession() as session:
            info = await _get_json(session, sim.url + "/_campaign/info")
            batch_ids: list[str] = info["batch_ids"]
            config = bridge_config(
                sim.url,
                valkey.url,
                batches=batch_ids,
                subscriptions=[{"name": "crm", "url": receiver.url + "/hook", "secret": SECRET}],
                upstream={
                    "page_size": PAGE_SIZE,
                    "max_requests_per_second": BUDGETS[budget_name],
                },
                poller={
                    "interval_seconds": INTERVAL_S,
                    "scan": scan,
                    "max_concurrent_batches": batches,
                    "lease_ttl_seconds": 60,
                },
                logging={"level": "INFO"},
            )
            with bridge_process(config, f"bridge_planner_{label}") as bridge:
                await _wait_first_cycles(session, bridge, len(batch_ids))
                async with session.post(sim.url + "/_campaign/start") as resp:
                    t0 = float((await resp.json())["started_at"])
                cpu0 = (bridge.cpu_s(), sim.cpu_s())
                state = await _wait_finished(session, sim.url)
                t_end = float(state["finished_at"])
                truth = await _get_json(session, sim.url + "/_campaign/truth")
                finals = _finals(truth)
                # Until every final status arrived (or SETTLE_MAX_S), and DRAIN_S at least.
                while True:
                    events = await _get_json(session, receiver.url + "/_events")
                    now = time.time()
                    done = not _missing(finals, events) and now >= t_end + DRAIN_S
                    if done or now > t_end + SETTLE_MAX_S:
                        break
                    await asyncio.sleep(1.0)
                cpu1 = (bridge.cpu_s(), sim.cpu_s())
                async with session.get(bridge.url + "/metrics") as resp:
                    metrics = parse_metrics(await resp.text())
            requests = await _get_json(session, sim.url + "/_campaign/requests", since=str(t0))
            report = await _ground_truth(session, sim.url, receiver.url, batch_ids)
            stats = await _get_json(session, receiver.url + "/_stats")
            late = late_events(truth, events)
            why = reasons(report, finals, _missing(finals, events), late, t0)
            traces = await explain(session, sim.url, receiver.url, t0, why)
    print_traces(traces)

    window_end = t_end + DRAIN_S
    in_window = [(float(t), kind) for t, kind in requests if float(t) <= window_end]
    by_kind: dict[str, int] = defaultdict(int)
    for _, kind in in_window:
        by_kind[kind] += 1
    bins = int((window_end - t0) // BIN_S) + 1
    per_bin = [0] * bins
    for t, _ in in_window:
        per_bin[int((t - t0) // BIN_S)] += 1
    lags = _lags(truth, events)
    lag_bins: list[list[float]] = [[] for _ in range(bins + 8)]
    for changed, lag in lags:
        lag_bins[min(len(lag_bins) - 1, max(0, int((changed - t0) // BIN_S)))].append(lag)
    final_lags = _lags([[b, c, s, t] for (b, c), (s, t) in finals.items()], events)
    plans = {
        f"{labels['plan']}:{labels['reason']}": v
        for labels, v in metrics.get("callbridge_scan_plans_total", [])
    }
    missing = _missing(finals, events)
    return {
        "scan": scan,
        "budget": budget_name,
        "budget_rps": BUDGETS[budget_name],
        "campaign_s": t_end - t0,
        "dials": state["dials"],
        "status_changes": len(truth),
        "requests": len(in_window),
        "requests_by_kind": dict(by_kind),
        "requests_per_min": [n * 60.0 / BIN_S for n in per_bin],
        "lag": _summary([lag for _, lag in lags]),
        "late_events": {
            f">{limit:.0f}s": sum(1 for _, lag in lags if lag > limit)
            for limit in (5.0, 10.0, 30.0)
        },
        "final_lag": _summary([lag for _, lag in final_lags]),
        "lag_p99_per_bin": [quantile(v, 0.99) if v else None for v in lag_bins],
        "events": len(events),
        "calls": len(finals),
        "missing_finals": len(missing),
        "missing_examples": missing[:10],
        "checker": {
            **report.figures(),
            "batch_completed": report.batch_completed,
            "two_bodies": stats["two_bodies"],
            "bad_signatures": stats["bad_signatures"],
            "missing_examples": [dataclasses.astuple(m) for m in report.missing[:10]],
            "invented_examples": [dataclasses.astuple(p) for p in report.invented[:5]],
            "broken_chain_examples": [dataclasses.astuple(p) for p in report.broken_chains[:5]],
        },
        "late_calls": len({(b, c) for b, c, *_ in late}),
        "explained": traces,
        "plans": plans,
        "anomalies": {
            labels["kind"]: v
            for labels, v in metrics.get("callbridge_upstream_anomalies_total", [])
        },
        "cpu_s": {"bridge": cpu1[0] - cpu0[0], "simulator": cpu1[1] - cpu0[1]},
        "elapsed_s": time.perf_counter() - started,
    }


async def run(quick: bool = False, profile: bool = True) -> dict[str, Any]:
    calls = 4_000 if quick else CALLS
    batches = 4 if quick else BATCHES
    runs = {}
    for budget_name in BUDGETS:
        for scan in ("full", "auto"):
            runs[f"{budget_name}_{scan}"] = await run_one(scan, budget_name, calls, batches)
    roomy = runs["roomy_full"]["requests"] / max(1, runs["roomy_auto"]["requests"])
    tight = runs["tight_full"]["lag"]["p99_s"] / runs["tight_auto"]["lag"]["p99_s"]
    result = {
        "batches": batches,
        "calls_per_batch": calls,
        "lines": LINES,
        "speed": SPEED,
        "interval_s": INTERVAL_S,
        "page_size": PAGE_SIZE,
        "budgets_rps": BUDGETS,
        "runs": runs,
        "request_ratio_roomy": roomy,
        "lag_p99_ratio_tight": tight,
        "targets": {"request_ratio": TARGET_REQUEST_RATIO, "lag_ratio": TARGET_LAG_RATIO},
        "missing_finals": {k: r["missing_finals"] for k, r in runs.items()},
        "checker_missing": {k: r["checker"]["missing"] for k, r in runs.items()},
    }
    plot(result)
    return result


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), constrained_layout=True)
    colours = {"full": "tab:red", "auto": "tab:blue"}
    for row, budget_name in enumerate(BUDGETS):
        for scan in ("full", "auto"):
            r = result["runs"][f"{budget_name}_{scan}"]
            xs = [i * BIN_S / 60 for i in range(len(r["requests_per_min"]))]
            axes[row][0].step(
                xs,
                r["requests_per_min"],
                where="post",
                color=colours[scan],
                label=f"{scan}: {r['requests']:,} requests",
            )
            lag = [(i * BIN_S / 60, v) for i, v in enumerate(r["lag_p99_per_bin"]) if v]
            axes[row][1].plot(
                [x for x, _ in lag],
                [v for _, v in lag],
                color=colours[scan],
                label=f"{scan}: p99 {r['lag']['p99_s']:.1f} s over the campaign",
            )
        budget = BUDGETS[budget_name]
        axes[row][0].set_title(f"{budget_name} budget ({budget:.0f} req/s): requests per minute")
        axes[row][0].set_xlabel("minutes since the campaign started")
        axes[row][0].set_ylabel("upstream requests / min")
        axes[row][0].legend()
        axes[row][1].set_title(f"{budget_name} budget: lag p99 per {BIN_S:.0f} s of changes")
        axes[row][1].set_xlabel("minutes since the campaign started")
        axes[row][1].set_ylabel("status change -> webhook (s)")
        axes[row][1].legend()
    fig.suptitle(
        f"{result['batches']} batches x {result['calls_per_batch']:,} calls, "
        f"{result['lines']} lines per batch, poll interval {result['interval_s']:.0f} s"
    )
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "planner.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 batches x 4,000 calls")
    parser.add_argument("--only", help="one run, e.g. roomy_auto (no plot)")
    ns = parser.parse_args()
    if ns.only:
        budget_name, scan = ns.only.split("_")
        calls, batches = (4_000, 4) if ns.quick else (CALLS, BATCHES)
        out = asyncio.run(run_one(scan, budget_name, calls, batches))
        out = {k: v for k, v in out.items() if k not in ("requests_per_min", "lag_p99_per_bin")}
    else:
        out = asyncio.run(run(quick=ns.quick))
        for r in out["runs"].values():
            r.pop("requests_per_min")
            r.pop("lag_p99_per_bin")
    print(json.dumps(out, indent=1, default=str))
