"""A receiver that hangs some requests, during a large campaign (issue 25, first target).

Three runs of the same campaign in one invocation, each with its own Valkey, campaign
simulator (`bench.campaign`: 8 batches x 10,000 calls, 60 lines per batch, speed 0.25,
about 2.5 minutes of dialling), receiver (`bench.bad_receiver`, verifying every
signature) and ``callbridge run`` subprocess on the **default config** (poll interval
5 s, page size 500, 10 upstream requests/s, ``max_in_flight`` 64, adaptive
concurrency) except the subscription's ``timeout_seconds``: 5, as the issue measured:

* ``plain``: the receiver answers every request 200 at once;
* ``control``: it fails 5 % of first attempts (500) and never hangs;
* ``hung``: the same 5 % fail, and another 2 % of first attempts hang 20 s (past the
  5 s timeout). Which ids fail is decided by the id and a seed, so the runs fail the
  same ones; `FlakyReceiver.first_attempt_fails` with share 0.07 and weights 5:2.

After the campaign, each run waits until every final status arrived and the queue is
empty (at most `SETTLE_MAX_S`), then runs the ground-truth checker over the campaign
(`tests.support.turbulence.check` as `bench.planner` runs it: required = every final
status and every status the platform served twice). Lag = from the moment the status
began (ground truth) to its first 2xx at the receiver, for every status event the
checker placed. Target: every required status delivered, and lag p50 and p99 of
``hung`` within 1.25x those of ``control`` (the ratios over ``plain`` are reported too).
The lag is mostly the wait for the next poll under the 10 requests/s budget, which
varies from run to run; its delivery part alone (the event's ``timestamp``, stamped by
the bridge once its cycle read every page, to the first 2xx) is reported beside it.
The adaptive limit is sampled from ``/metrics`` every 0.5 s
(`bench.bad_common.MetricsSampler`), and per batch the longest time without a poll
cycle. A batch that goes `STALL_S` without one while the campaign runs has stalled (a
poller bug, docs/performance.md section 12: its statuses go missing and its share of
the budget goes to the other batches, so the run measures something else): that run is
abandoned, recorded in ``poll_stalls``, and made again once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
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
    oncall_subscription,
    summary,
)
from bench.common import RESULTS, bridge_config, bridge_process, child_server, valkey_server
from bench.lag import _ts as iso_ts
from bench.planner import _finals, _ground_truth, _missing, _wait_first_cycles

BATCHES = 8
CALLS = 10_000
LINES = 60
SPEED = 0.25
INTERVAL_S = 5.0  # the default
TIMEOUT_S = 5.0
FAIL_SHARE = 0.05
HANG_SHARE = 0.02
HANG_S = 20.0
SETTLE_MAX_S = 240.0
# A batch with no poll cycle for this long while the campaign runs has stalled (a
# poller bug: its statuses would go missing and its budget would go to the others, so
# the run compares nothing): the run is abandoned and made again, once.
STALL_S = 60.0
TARGET_RATIO = 1.25
RUNS = {
    "plain": {"share": 0.0, "kinds": "500=1"},
    "control": {"share": FAIL_SHARE, "kinds": "500=5"},
    "hung": {"share": FAIL_SHARE + HANG_SHARE, "kinds": "500=5,hang=2"},
}


async def _settle(
    session: aiohttp.ClientSession,
    receiver_url: str,
    sampler: MetricsSampler,
    finals: dict[tuple[str, str], tuple[str, float]],
    t_end: float,
) -> tuple[list[list[Any]], float]:
    """Until every final status arrived and the queue is empty, or `SETTLE_MAX_S`;
    returns the events and when the wait ended."""
    while True:
        events = await get_json(session, receiver_url + "/_events")
        depth = sampler.last().get("depth", {})
        queued = sum(depth.get(k, 0) for k in ("ready", "scheduled", "waiting", "inflight"))
        now = time.time()
        if (not _missing(finals, events) and queued == 0) or now > t_end + SETTLE_MAX_S:
            return events, now
        await asyncio.sleep(2.0)


class PollStall(RuntimeError):
    """A batch stopped being polled mid-campaign (see `STALL_S`)."""

    def __init__(self, label: str, gaps: dict[str, float], since_start_s: float) -> None:
        super().__init__(f"{label}: no poll cycle of {gaps} for {STALL_S:.0f} s")
        self.record = {"run": label, "gaps_s": gaps, "after_start_s": since_start_s}


async def _wait_finished_unless_stalled(
    session: aiohttp.ClientSession, sim_url: str, sampler: MetricsSampler, label: str
) -> dict[str, Any]:
    started = time.time()
    while True:
        state: dict[str, Any] = await get_json(session, sim_url + "/_campaign/state")
        if state["finished"]:
            return state
        stalled = sampler.stalled(STALL_S)
        if stalled:
            await sampler.stop()
            raise PollStall(label, stalled, time.time() - started)
        await asyncio.sleep(1.0)


async def run_one(label: str, batches: int, calls: int) -> dict[str, Any]:
    started = time.perf_counter()
    spec = RUNS[label]
    receiver_args = ["--fail-share", str(spec["share"]), "--fail-kinds", str(spec["kinds"])]
    receiver_args += ["--hang-seconds", str(HANG_S)]
    sim_args = ["--batches", str(batches), "--calls", str(calls), "--lines", str(LINES)]
    sim_args += ["--speed", str(SPEED)]
    with (
        valkey_server() as valkey,
        child_server("bench.campaign", sim_args, f"campaign_bad_hung_{label}") as sim,
        bad_receiver(receiver_args, f"receiver_bad_hung_{label}") as receiver,
    ):
        async with aiohttp.ClientSession() as session:
            info = await get_json(session, sim.url + "/_campaign/info")
            batch_ids: list[str] = info["batch_ids"]
            config = bridge_config(
                sim.url,
                valkey.url,
                batches=batch_ids,
                subscriptions=[
                    crm_subscription(receiver, timeout_seconds=TIMEOUT_S),
                    oncall_subscription(receiver),
                ],
                # The defaults (bench.common's config sets a roomy budget and 1 s).
                upstream={"max_requests_per_second": 10.0, "timeout_seconds": 10.0},
                poller={"interval_seconds": INTERVAL_S},
                logging={"level": "INFO"},
            )
            with bridge_process(config, f"bridge_bad_hung_{label}") as bridge:
                await _wait_first_cycles(session, bridge, len(batch_ids))
                sampler = MetricsSampler(bridge, session)
                sampler.start()
                async with session.post(sim.url + "/_campaign/start") as resp:
                    t0 = float((await resp.json())["started_at"])
                cpu0 = bridge.cpu_s()
                state = await _wait_finished_unless_stalled(session, sim.url, sampler, label)
                t_end = float(state["finished_at"])
                truth = await get_json(session, sim.url + "/_campaign/truth")
                finals = _finals(truth)
                events, settled = await _settle(session, receiver.url, sampler, finals, t_end)
                cpu1 = bridge.cpu_s()
                await sampler.stop()
            report = await _ground_truth(
                session, sim.url, receiver.url, batch_ids, interval_s=INTERVAL_S
            )
            stats = await get_json(session, receiver.url + "/_stats")
            ops = await get_json(session, receiver.url + "/_ops")
    last = sampler.last()
    missing_finals = _missing(finals, events)
    (RESULTS / f"bad_days_hung_{label}_events.json").write_bytes(orjson.dumps(events))
    return {
        "label": label,
        "receiver": spec,
        "campaign_s": t_end - t0,
        "settled_after_end_s": settled - t_end,
        "status_changes": len(truth),
        "calls": len(finals),
        "events": len(events),
        "missing_finals": len(missing_finals),
        "checker": {
            **report.figures(),
            "batch_completed": report.batch_completed,
            "missing_examples": [dataclasses.astuple(m) for m in report.missing[:10]],
        },
        "lag": {
            "p50_s": report.lag(50),
            "p99_s": report.lag(99),
            "max_s": report.lag(100),
            "n": len(report.lags_s),
        },
        # The delivery side alone: the event's timestamp (the bridge stamps it once its
        # cycle read every page) to its first 2xx.
        "after_observed": summary(
            [float(received) - iso_ts(stamp) for received, *_, stamp in events if stamp]
        ),
        "receiver_stats": stats,
        "ops_events": [[round(t - t0, 1), kind] for t, kind, _data, _ok in ops],
        "limit": sampler.limit_stats(t0, t_end),
        # Per batch, the longest stretch without a poll cycle (a stalled batch's calls
        # go missing: that is the poller, not delivery).
        "poll_gap_max_s": sampler.poll_gaps(t0, settled),
        "limit_changes": last.get("changes", {}),
        "detached": last.get("detached", 0.0),
        "promoted": last.get("promoted", 0.0),
        "attempts": last.get("attempts", {}),
        "mean_request_s": last.get("duration_sum", 0.0) / max(1.0, last.get("duration_count", 0)),
        "bridge_cpu_share": (cpu1 - cpu0) / max(1e-9, settled - t0),
        "series": sampler.series(t0),
        "subscription": SUB,
        "elapsed_s": time.perf_counter() - started,
    }


async def run(quick: bool = False) -> dict[str, Any]:
    batches, calls = (2, 2_500) if quick else (BATCHES, CALLS)
    runs: dict[str, Any] = {}
    stalls: list[dict[str, Any]] = []
    for label in RUNS:
        for attempt in (1, 2):
            try:
                runs[label] = await run_one(label, batches, calls)
                break
            except PollStall as stall:
                print(f"{stall}; abandoned (attempt {attempt})", file=sys.stderr)
                stalls.append(stall.record)
                if attempt == 2:
                    raise
    result = {
        "poll_stalls": stalls,
        "batches": batches,
        "calls_per_batch": calls,
        "lines": LINES,
        "speed": SPEED,
        "interval_s": INTERVAL_S,
        "timeout_s": TIMEOUT_S,
        "hang_s": HANG_S,
        "runs": runs,
        # hung / the run without hangs (the target), and / the run without failures.
        "ratios": {base: _ratios(runs["hung"], runs[base]) for base in ("control", "plain")},
        "target_ratio": TARGET_RATIO,
    }
    plot(result)
    return result


def _ratios(hung: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """Lag percentiles of the hung run over those of `base`: end to end, and the
    delivery part alone (the event's timestamp to its first 2xx)."""
    out = {}
    for part, name in (("lag", "lag"), ("after_observed", "delivery")):
        for q in ("p50", "p99"):
            out[f"{name}_{q}"] = hung[part][f"{q}_s"] / base[part][f"{q}_s"]
    return out


def plot(result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import IMG

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True, constrained_layout=True)
    colours = {"control": "tab:blue", "plain": "tab:green", "hung": "tab:red"}
    for label, r in result["runs"].items():
        s = r["series"]
        lag = r["lag"]
        name = f"{label}: lag p50 {lag['p50_s']:.1f} s, p99 {lag['p99_s']:.1f} s"
        axes[0].step(s["t_s"], s["limit"], where="post", color=colours[label], label=name)
        axes[1].plot(s["t_s"], s["backlog"], color=colours[label], label=label)
        axes[2].plot(s["t_s"], s["detached"], color=colours[label], label=label)
        end = r["campaign_s"]
        for ax in axes:
            ax.axvline(end, color=colours[label], linestyle=":", linewidth=1)
    axes[0].set_ylabel("concurrency limit")
    axes[0].set_title(
        f"{result['batches']} x {result['calls_per_batch']:,} calls, default config, timeout "
        f"{result['timeout_s']:.0f} s; hung: 2 % of first attempts hang "
        f"{result['hang_s']:.0f} s (control and hung: 5 % fail)"
    )
    axes[0].legend()
    axes[1].set_ylabel("queued deliveries")
    axes[1].legend()
    axes[2].set_ylabel("detached requests (total)")
    axes[2].set_xlabel("seconds since the campaign started (dotted: its end)")
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG / "bad_days_hung.png", dpi=100)
    plt.close(fig)
