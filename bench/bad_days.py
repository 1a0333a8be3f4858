"""The delivery side's bad days (issue 25): ``python -m bench.bad_days SCENARIO [--quick]``.

Scenarios, each runnable alone (``all`` runs the three in turn):

* ``hung`` (`bench.bad_hung`): 8 batches x 10,000 calls on the default config, a
  receiver that hangs 2 % of first attempts for 20 s and fails 5 %, against the same
  campaign with a receiver that only fails the 5 %: every required status delivered,
  lag p50/p99 within 1.25x;
* ``capacity`` (`bench.bad_capacity`): a receiver that serves 8 requests at once in
  50 ms each and queues the rest, fed backlogs of thousands of events: its latency
  within 2x its unloaded latency, the backlog drained at >= 0.8x its capacity;
* ``outages`` (`bench.bad_outage`): 1,200 calls in 2 batches, 1 s poll interval, a
  receiver failing 20 % of first attempts that refuses connections for 60 s, then (a
  second run) answers 503 for 60 s, mid-campaign: nothing missing, every event it
  missed delivered within 15 s of its return. ``--long``: the 10-minute outage
  (connections refused) instead, alone (it takes ~12 minutes).

Each run writes ``bench/results/bad_days_<scenario>.json`` and its plot in
``docs/img/bad_days_<scenario>.png``, then prints a table; ``--table`` prints the table
again from the JSON files. Run it niced on a shared machine: ``nice -n 10 python -m
bench.bad_days hung``. See docs/performance.md, section 12.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from typing import Any

from bench.common import RESULTS, machine_info
from bench.run import code_version

SCENARIOS = ("hung", "capacity", "outages")


async def run_scenario(name: str, quick: bool, long: bool) -> dict[str, Any]:
    if name == "hung":
        from bench import bad_hung

        return await bad_hung.run(quick)
    if name == "capacity":
        from bench import bad_capacity

        return await bad_capacity.run(quick)
    from bench import bad_outage

    return await bad_outage.run(quick, long)


def _f(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def hung_rows(r: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, run in r["runs"].items():
        c = run["checker"]
        rows.append(
            [
                f"hung/{label}: required delivered",
                f"{c['required'] - c['missing']:,} of {c['required']:,}",
                f"missing {c['missing']}, invented {c['invented']}",
                "",
                "0 missing",
                _verdict(c["missing"] == 0),
            ]
        )
        lag, obs = run["lag"], run["after_observed"]
        gap = max(run["poll_gap_max_s"].values(), default=float("nan"))
        rows.append(
            [
                f"hung/{label}: lag p50 / p99",
                f"{lag['p50_s']:.1f} s / {lag['p99_s']:.1f} s",
                f"delivery part {obs['p50_s']:.2f} s / {obs['p99_s']:.1f} s",
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"hung/{label}: limit, detached",
                f"p50 {_f(run['limit']['p50'], '.0f')} (min {_f(run['limit']['min'], '.0f')})",
                f"{run['detached']:.0f} detached, longest poll gap {gap:.0f} s",
                "",
                "",
                "",
            ]
        )
    for stall in r.get("poll_stalls", []):
        gaps = ", ".join(f"{b} {s:.0f} s" for b, s in stall["gaps_s"].items())
        rows.append(
            [
                f"hung/{stall['run']}: poller stall",
                f"{gaps} without a cycle",
                f"{stall['after_start_s']:.0f} s into the campaign",
                "",
                "",
                "run again",
            ]
        )
    target = r["target_ratio"]
    hung = r["runs"]["hung"]
    for base in ("control", "plain"):
        for q in ("p50", "p99"):
            ratio = r["ratios"][base][f"lag_{q}"]
            delivery = r["ratios"][base][f"delivery_{q}"]
            rows.append(
                [
                    f"hung: lag {q} hung / {base}",
                    f"{hung['lag'][q + '_s']:.1f} s",
                    f"{r['runs'][base]['lag'][q + '_s']:.1f} s {base}",
                    f"{ratio:.2f}x (delivery part {delivery:.2f}x)",
                    f"<= {target}x" if base == "control" else "",
                    _verdict(ratio <= target) if base == "control" else "",
                ]
            )
    return rows


def capacity_rows(r: dict[str, Any]) -> list[list[str]]:
    rows = [
        [
            "capacity: unloaded latency",
            f"{1000 * r['unloaded']['p50_s']:.1f} ms",
            f"N={r['capacity']}, {r['service_ms']:.0f} ms",
            "",
            "",
            "",
        ],
        [
            "capacity: ceiling at N at once",
            f"{r['ceiling']['per_s']:.0f}/s",
            f"{r['nominal_per_s']:.0f}/s nominal",
            f"{r['ceiling']['per_s'] / r['nominal_per_s']:.2f}x",
            "",
            "",
        ],
    ]
    for name, phase in r["phases"].items():
        lat = phase["latency"]
        ratio = lat["p99_s"] / r["unloaded"]["p50_s"]
        rows.append(
            [
                f"capacity/{name}: latency p50 / p99",
                f"{1000 * lat['p50_s']:.0f} / {1000 * lat['p99_s']:.0f} ms",
                f"{1000 * r['unloaded']['p50_s']:.1f} ms unloaded",
                f"{lat['p50_s'] / r['unloaded']['p50_s']:.2f}x / {ratio:.2f}x",
                f"<= {r['target_latency_ratio']}x",
                _verdict(ratio <= r["target_latency_ratio"]),
            ]
        )
        drain = phase["drain_per_s"]
        rows.append(
            [
                f"capacity/{name}: drain ({phase['events']:,} events)",
                f"{drain:.0f}/s",
                f"{r['nominal_per_s']:.0f}/s capacity",
                f"{drain / r['nominal_per_s']:.2f}x",
                f">= {r['target_drain_ratio']}x",
                _verdict(drain / r["nominal_per_s"] >= r["target_drain_ratio"]),
            ]
        )
    return rows


def outage_rows(r: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, run in r["runs"].items():
        c = run["checker"]
        rows.append(
            [
                f"outage/{label}: required delivered",
                f"{c['required'] - c['missing']:,} of {c['required']:,}",
                f"missing {c['missing']}, lag p99 {c['lag_p99_s']:.1f} s",
                "",
                "0 missing",
                _verdict(c["missing"] == 0),
            ]
        )
        missed = run["missed"]
        bound = r["target_after_return_s"]
        never = missed.get("undelivered_ids", 0)
        rows.append(
            [
                f"outage/{label}: missed, after return",
                f"p99 {_f(missed['p99_s'], '.1f')} s, max {_f(missed['max_s'], '.1f')} s",
                f"{missed['n']:,} arrived ({missed['over_target']} > {bound:.0f} s), "
                f"{never} not by the end, first {_f(missed['first_s'], '.1f')} s",
                "",
                f"max <= {bound:.0f} s",
                _verdict(missed["n"] > 0 and missed["max_s"] <= bound and never == 0),
            ]
        )
        rows.append(
            [
                f"outage/{label}: on-call heard",
                ", ".join(
                    f"{k.replace('subscription.', '')} {t:+.0f} s" for t, k in run["ops_relative"]
                )
                or "nothing",
                "",
                "",
                "",
                "",
            ]
        )
    return rows


ROWS = {"hung": hung_rows, "capacity": capacity_rows, "outages": outage_rows}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    rows = [["figure", "value", "against", "ratio", "target", ""]]
    for name, result in results.items():
        rows += ROWS[name](result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _path(name: str, long: bool) -> Any:
    return RESULTS / f"bad_days_{name}{'_long' if long else ''}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument("--quick", action="store_true", help="smaller, shorter runs")
    parser.add_argument("--long", action="store_true", help="outages: the 10-minute one")
    parser.add_argument("--table", action="store_true", help="print the saved figures")
    ns = parser.parse_args()
    names = SCENARIOS if ns.scenario == "all" else (ns.scenario,)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        path = _path(name, ns.long and name == "outages")
        if ns.table:
            results[name] = json.loads(path.read_text())
            continue
        started = time.perf_counter()
        result = asyncio.run(run_scenario(name, ns.quick, ns.long))
        result["meta"] = {
            "quick": ns.quick,
            "elapsed_s": time.perf_counter() - started,
            "machine": machine_info(),
            "code": code_version(),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        print(f"{name}: {result['meta']['elapsed_s']:.0f} s, wrote {path}", file=sys.stderr)
        results[name] = result
    print_table(results)


if __name__ == "__main__":
    main()
