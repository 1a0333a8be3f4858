"""What tracing costs (issue 22): the flood, with tracing off against another checkout's
code (main) in the same run, and with tracing on.

``python -m bench.tracing_cost --base /path/to/main-worktree [--rounds 2]``

Each round runs the flood (`bench.flood.one_flood`: 20,000 completions at one instant
through a real ``callbridge run``) three times over the same Valkey, simulator and
receiver, one bridge after the other:

* ``base``: the other checkout's code (its ``service/`` first on the bridge's
  ``PYTHONPATH``), default config;
* ``off``: this checkout, default config (tracing off);
* ``on``: this checkout, ``tracing.enabled``, exporting OTLP/HTTP to `bench.otlp_sink`
  (a process of its own) with a batch queue large enough that no span is dropped, so
  the cost is that of every span made and exported.

Each flood's rate is also divided by plain aiohttp POSTs of the same bodies measured
right after it (`flood.plain`), which takes the machine's load of that moment out.
Reported: per variant the median webhooks/s, ratio and bridge CPU per webhook; the
off/base and on/off ratios; spans received by the sink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp

from bench.common import RESULTS, child_server, valkey_server
from bench.flood import CALLS, RECEIVER_ARGS, _json, one_flood

VARIANTS = ("base", "off", "on")
# Every span kept and exported (the default queue, 2,048, drops most of a flood's).
ON_ENV = {
    "OTEL_BSP_MAX_QUEUE_SIZE": "200000",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2048",
    "OTEL_BSP_SCHEDULE_DELAY": "500",
}


async def run(base: Path, rounds: int) -> dict[str, Any]:
    floods = rounds * len(VARIANTS)
    with (
        valkey_server() as valkey,
        child_server(
            "bench.sim_server", ["--layout", f"{floods}x{CALLS}"], "sim_server_tracing"
        ) as sim,
        child_server(
            "bench.receiver", ["--verify-every", "50", *RECEIVER_ARGS], "receiver_tracing"
        ) as receiver,
        child_server("bench.otlp_sink", [], "otlp_sink") as sink,
    ):
        envs: dict[str, dict[str, str]] = {
            "base": {"PYTHONPATH": f"{base / 'service'}:{base}"},
            "off": {},
            "on": {**ON_ENV, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.url},
        }
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        async with aiohttp.ClientSession() as session:
            batch_ids: list[str] = (await _json(session, "GET", sim.url + "/_bench/info"))[
                "batch_ids"
            ]
            for i in range(floods):
                variant = VARIANTS[i % len(VARIANTS)]
                out = await one_flood(
                    session, valkey, sim, receiver, batch_ids[i], i, profile=False,
                    env=envs[variant],
                    tracing={"enabled": True} if variant == "on" else None,
                )  # fmt: skip
                out.pop("valkey_commandstats", None)
                runs[variant].append(out)
                print(variant, f"{out['per_s']:.0f}/s ratio {out['ratio']:.3f}", flush=True)
            spans = await _json(session, "GET", sink.url + "/_stats")

    def summary(variant: str) -> dict[str, Any]:
        rs = runs[variant]
        return {
            "per_s": median(r["per_s"] for r in rs),
            "ratio": median(r["ratio"] for r in rs),
            "ratio_samples": [round(r["ratio"], 3) for r in rs],
            "bridge_cpu_ms_per_webhook": median(r["bridge_cpu_ms_per_webhook"] for r in rs),
            "first_after_switch_s": median(r["first_after_switch_s"] for r in rs),
        }

    s = {v: summary(v) for v in VARIANTS}
    return {
        "calls": CALLS,
        "rounds": rounds,
        "variants": s,
        "off_over_base": s["off"]["ratio"] / s["base"]["ratio"],
        "on_over_off": s["on"]["ratio"] / s["off"]["ratio"],
        "on_extra_cpu_ms_per_webhook": s["on"]["bridge_cpu_ms_per_webhook"]
        - s["off"]["bridge_cpu_ms_per_webhook"],
        "sink": spans,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    ns = parser.parse_args()
    result = asyncio.run(run(ns.base.resolve(), ns.rounds))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tracing_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
