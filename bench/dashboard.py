"""The dashboard's picture: ``python -m bench.dashboard [--seconds 240]``.

Runs a real bridge (``callbridge run``) against the simulator with two receivers,
scraped every second by a real Prometheus, through a scripted afternoon:

* from the start: three batches of calls moving through their lifecycle, polled with
  a request budget (15 requests/s) smaller than the batches want, so the effective
  poll period stays above the 1 s interval;
* at 25 %: the ``legacy`` endpoint turns flaky (two requests in three answered 503):
  retries, and dead letters after two retries;
* at 40 %: ``legacy`` is down (every request 503): its breaker opens, its queue grows;
* at 45-60 %: the platform rate-limits 15 % of the requests (429);
* at 60 %: ``legacy`` answers again and its dead letters are replayed with
  ``callbridge admin dead-letters replay legacy``;
* at 75 %: a fourth batch is added with ``callbridge admin batches add``.

Then it evaluates every panel's queries of ``charts/callbridge/dashboards/callbridge.json``
over the run with Prometheus's ``query_range`` and draws them in the dashboard's own
layout (``gridPos``) to ``docs/img/dashboard.png``. The real Prometheus, bridge and
receivers are the test suite's (``tests/support``); Debian's ``prometheus`` package
must be installed, and matplotlib (``pip install '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from bench.common import IMG, stop_process
from callbridge.cli import admin as admin_cli
from callbridge.cli.main import build_parser
from callbridge.simulator import FaultConfig, Simulator, SimulatorConfig, make_app
from tests.support.bridge import start_bridge, stop_bridge, write_config
from tests.support.dashboard import Query, load, queries
from tests.support.prometheus import Prometheus, running_prometheus, wait_for
from tests.support.receivers import Receiver
from tests.support.servers import free_port, start_server
from tests.support.settings import API_KEY, SECRET

TOKEN = "bench-admin-token-0123456789"
RATE_INTERVAL = "20s"
STEP_S = 2.0


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def admin(url: str, *argv: str) -> str:
    """``callbridge admin ARGV`` in-process; returns what it printed."""
    args = build_parser().parse_args(["admin", "--url", url, "--token", TOKEN, *argv])
    out, err = io.StringIO(), io.StringIO()
    code = await admin_cli.run(args, out, err, env={})
    if code:
        raise RuntimeError(f"callbridge admin {' '.join(argv)}: exit {code}: {err.getvalue()}")
    return out.getvalue()


async def scenario(seconds: float, sim: Simulator, legacy: Receiver, bridge_url: str) -> None:
    """The afternoon the docstring describes, one simulator step a second."""
    started = time.monotonic()
    done: set[str] = set()

    def due(name: str, at: float) -> bool:
        if name in done or time.monotonic() - started < at * seconds:
            return False
        done.add(name)
        print(f"{time.monotonic() - started:5.0f}s {name}", flush=True)
        return True

    while time.monotonic() - started < seconds:
        sim.advance()
        if due("legacy endpoint flaky", 0.25):
            flaky = random.Random(1).choices([200, 503], weights=[1, 2], k=1_000_000)
            legacy.answers.extend(flaky)
        if due("legacy endpoint down", 0.40):
            legacy.answers.clear()
            legacy.default = 503
        if due("platform rate-limits 15% of requests", 0.45):
            sim.faults = FaultConfig(rate_limit_ratio=0.15, retry_after_seconds=1)
        if due("rate limiting over", 0.60):
            sim.faults = FaultConfig()
        if due("legacy back; dead letters replayed", 0.60):
            legacy.default = 200
            print(await admin(bridge_url, "dead-letters", "replay", "legacy"), end="")
        if due("fourth batch added", 0.75):
            sim.add_batch("sched_late", 300)
            print(await admin(bridge_url, "batches", "add", "sched_late"), end="")
        await asyncio.sleep(1)


async def collect(
    prom: Prometheus, qs: Sequence[Query], start: float, end: float
) -> dict[str, list[tuple[Query, list[dict[str, Any]]]]]:
    """Panel title -> [(query, series)] over the run."""
    out: dict[str, list[tuple[Query, list[dict[str, Any]]]]] = {}
    for q in qs:
        out.setdefault(q.panel, []).append((q, await prom.query_range(q.expr, start, end, STEP_S)))
    return out


def legend(q: Query, labels: dict[str, str]) -> str:
    text = q.legend
    for name, value in labels.items():
        text = text.replace("{{" + name + "}}", value)
    return text or q.panel


def draw(
    data: dict[str, list[tuple[Query, list[dict[str, Any]]]]], start: float, out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    panels = load()["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.45))
    grid = GridSpec(rows, 24, figure=fig, hspace=4.0, wspace=3.5, top=0.96)
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=10, loc="left")
        ax.tick_params(labelsize=7)
        unit = p["fieldConfig"]["defaults"].get("unit", "")
        bottom = g["y"] + g["h"] == rows
        for q, series in data.get(p["title"], []):
            for s in sorted(series, key=lambda s: legend(q, s["metric"])):
                t = [(float(v[0]) - start) / 60 for v in s["values"]]
                y = [float(v[1]) for v in s["values"]]
                if p["type"] != "stat" and not any(y):
                    continue  # a series at 0 all along (Grafana would draw it; it says little)
                ax.plot(t, y, linewidth=1, label=legend(q, s["metric"]))
        if p["type"] == "stat":
            last = [
                float(s["values"][-1][1]) for _, series in data.get(p["title"], []) for s in series
            ]
            value = last[0] if last else math.nan
            text = f"{value:.0%}" if unit == "percentunit" else f"{value:g}"
            ax.text(0.98, 0.9, text, transform=ax.transAxes, ha="right", va="top", fontsize=16)
            ax.set_yticks([])
            ax.set_xticks([])
        else:
            if bottom:
                ax.set_xlabel("minutes", fontsize=8)
            if unit:
                ax.set_ylabel(unit, fontsize=7)
            handles, _ = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=6, ncol=2 if len(handles) > 4 else 1, loc="upper left")
            else:
                ax.text(0.5, 0.5, "every series at 0", transform=ax.transAxes, ha="center")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "callbridge dashboard: its queries over a scripted run against a real Prometheus",
        fontsize=13,
        y=0.985,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    print(f"wrote {out}")


async def main(seconds: float, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="cb-dashboard-") as tmp_name:
        tmp = Path(tmp_name)
        redis_port = free_port()
        valkey = start_server(tmp / "valkey", redis_port)
        sim = Simulator(SimulatorConfig(api_key=API_KEY, batches=3, calls_per_batch=300, seed=7))
        crm, legacy = Receiver(), Receiver()
        runners = []
        try:
            for app in (make_app(sim), crm.app(), legacy.app()):
                runners.append(await serve(app))
            (_, upstream), (_, crm_url), (_, legacy_url) = runners
            port = free_port()
            config = write_config(
                tmp / "bridge.yaml",
                upstream,
                f"redis://127.0.0.1:{redis_port}/0",
                crm_url + "/hook",
                sim.batch_ids,
                upstream={"max_requests_per_second": 15, "page_size": 50},
                poller={"interval_seconds": 1, "jitter_ratio": 0.1},
                # The breaker opens when legacy is down, not while it is flaky (so
                # deliveries exhaust their retries), and closes soon after it is back.
                delivery={
                    "breaker_failure_threshold": 20,
                    "breaker_cooloff_seconds": 5,
                    "breaker_cooloff_max_seconds": 20,
                },
                admin={"token": TOKEN},
                server={"port": port},
            )
            raw = yaml.safe_load(config.read_text())
            raw["subscriptions"][0]["retry_schedule_seconds"] = [1, 2, 4]
            raw["subscriptions"].append(
                {
                    "name": "legacy",
                    "url": legacy_url + "/hook",
                    "secret": SECRET,
                    "retry_schedule_seconds": [1, 2],
                }
            )
            config.write_text(yaml.safe_dump(raw))
            async with running_prometheus(tmp / "prometheus", [f"127.0.0.1:{port}"]) as prom:
                bridge = await start_bridge(config, log=tmp / "bridge.log")
                try:
                    bridge_url = f"http://127.0.0.1:{port}"
                    await wait_for(
                        prom.targets_up, timeout_s=60, what="Prometheus scraping the bridge"
                    )
                    start = time.time()
                    await scenario(seconds, sim, legacy, bridge_url)
                    end = time.time()
                    data = await collect(prom, queries(RATE_INTERVAL), start, end)
                finally:
                    await stop_bridge(bridge)
            draw(data, start, out)
        finally:
            for runner, _ in runners:
                await runner.cleanup()
            stop_process(valkey)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=240, help="length of the run")
    parser.add_argument("--out", type=Path, default=IMG / "dashboard.png")
    ns = parser.parse_args()
    asyncio.run(main(ns.seconds, ns.out))
