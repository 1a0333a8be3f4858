"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME] [--no-profile]``.

Writes ``bench/results/latest.json`` (machine, code version, every figure with its
ceiling and ratio) and the plots in ``docs/img/``, then prints a table. Every
figure is a ratio against a ceiling measured in the same run, because the machine
is shared and noisy; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import budget, delivery, failover, flood, lag, poll_cycle, scale
from bench.common import IMG, REPO, RESULTS, machine_info

BENCHMARKS: dict[str, Callable[[bool, bool], Coroutine[Any, Any, dict[str, Any]]]] = {
    "poll_cycle": poll_cycle.run,
    "delivery": delivery.run,
    "lag": lag.run,
    "scale": scale.run,
    "budget": budget.run,
    "failover": failover.run,
    "flood": flood.run,
}


def code_version() -> dict[str, Any]:
    """The commit measured and whether the work tree differed from it."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout

    # Porcelain lines are "XY path": keep the leading status column intact.
    dirty = [line[3:] for line in git("status", "--porcelain", "service").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip(), "service_files_modified": dirty}


# -- table -------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _verdict(ratio: float, target: float | None, higher_is_better: bool) -> str:
    if target is None:
        return ""
    ok = ratio >= target if higher_is_better else ratio <= target
    return "PASS" if ok else "MISS"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    poll = results.get("poll_cycle")
    if poll:
        for name, c in poll["cases"].items():
            target = c["target_ratio"]
            rows.append(
                [
                    f"poll {name}",
                    f"{1000 * c['cycle_cpu_s']:.0f} ms CPU",
                    f"{1000 * c['ceiling_cpu_s']:.0f} ms loads",
                    f"{c['ratio']:.2f}x",
                    f"<= {target}x" if target else "",
                    _verdict(c["ratio"], target, higher_is_better=False),
                ]
            )
        mem = poll["memory"]["after_cold"]
        target_b = poll["memory"]["target_snapshot_bytes_per_call"]
        rows.append(
            [
                "redis snapshot / call",
                f"{mem['snapshot_bytes_per_call']:.0f} B",
                "",
                "",
                f"<= {target_b:.0f} B",
                "PASS" if mem["snapshot_bytes_per_call"] <= target_b else "MISS",
            ]
        )
        after = poll["memory"].get("after_warm_cycles", {})
        rows.append(
            [
                "redis timeline / call",
                f"{mem['timeline_bytes_per_call']:.0f} B"
                + (f" ({after['timeline_bytes_per_call']:.0f} B later)" if after else ""),
                "",
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                "redis used_memory / call",
                f"{_fmt(mem.get('used_memory_delta_per_call'), '.0f')} B",
                "",
                "",
                "",
                "",
            ]
        )
    dlv = results.get("delivery")
    if dlv:
        for c, row in dlv["concurrency"].items():
            plain = row["plain"]["per_s"]
            for mode in delivery.SERVICE_MODES:
                r = row[mode]
                rows.append(
                    [
                        f"delivery {mode} C={c}",
                        f"{r['per_s']:.0f}/s",
                        f"{plain:.0f}/s plain",
                        f"{r['ratio']:.2f}x",
                        f">= {dlv['target_ratio']}x",
                        _verdict(r["ratio"], dlv["target_ratio"], higher_is_better=True),
                    ]
                )
        rows.append(
            [
                "redis per queued delivery",
                f"{dlv['memory_per_queued_delivery_bytes']:.0f} B",
                "",
                "",
                "",
                "",
            ]
        )
    rows += _fleet_rows(results)
    rows += _flood_rows(results)
    return rows


def _flood_rows(results: dict[str, Any]) -> list[list[str]]:
    fl = results.get("flood")
    if not fl:
        return []
    first = fl["first_after_switch_s"]
    return [
        [
            f"flood {fl['calls']} completions",
            f"{fl['per_s']:.0f}/s",
            f"{fl['plain_per_s']:.0f}/s plain",
            f"{fl['ratio']:.2f}x",
            f">= {fl['target_ratio']}x",
            _verdict(fl["ratio"], fl["target_ratio"], higher_is_better=True),
        ],
        [
            "flood first webhook",
            f"{first:.2f} s",
            f"{fl['interval_s']:.1f} s interval",
            f"{first / fl['interval_s']:.2f}x",
            f"<= {fl['target_first_s']:.1f} s",
            _verdict(first, fl["target_first_s"], higher_is_better=False),
        ],
    ]


def _fleet_rows(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the lag, scale, budget and failover benchmarks."""
    rows: list[list[str]] = []
    lg = results.get("lag")
    if lg:
        lat, seg, iv = lg["lag"], lg["segments"], lg["interval_s"]
        rows.append(
            [
                "lag p50 / p95",
                f"{lat['p50_s']:.2f} s / {lat['p95_s']:.2f} s",
                f"{iv:.1f} s interval",
                f"{lat['p50_s'] / iv:.2f}x / {lat['p95_s'] / iv:.2f}x",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"lag p99 ({lg['delivered_matched']} events)",
                f"{lat['p99_s']:.2f} s",
                f"{iv:.1f} s interval",
                f"{lg['ratio_p99_to_interval']:.2f}x",
                f"<= {lg['target_ratio']:.2f}x",
                _verdict(lg["ratio_p99_to_interval"], lg["target_ratio"], higher_is_better=False),
            ]
        )
        rows.append(
            [
                "lag p99 wait/scan/deliver",
                " / ".join(f"{seg[k]['p99_s']:.2f}" for k in ("wait", "scan", "deliver")) + " s",
                "",
                "",
                "",
                "",
            ]
        )
    sc = results.get("scale")
    if sc:
        for case, lin in sc["linearity"].items():
            per = lin["cpu_ms_per_1k_calls"].values()
            fit = lin["fit"]
            rows.append(
                [
                    f"scale {case} CPU/1k calls",
                    f"{min(per):.1f}-{max(per):.1f} ms",
                    f"fit {fit['per_batch_ms']:.2f} ms/batch + {fit['per_1k_calls_ms']:.2f}/1k",
                    f"{lin['spread']:.2f}x max/min",
                    f"<= {sc['target_spread']}x",
                    _verdict(lin["spread"], sc["target_spread"], higher_is_better=False),
                ]
            )
    bd = results.get("budget")
    if bd:
        b = bd["budget_rps"]
        rows.append(
            [
                "budget max req in any 1 s",
                f"{bd['max_in_any_1s']}",
                f"{b:.0f}/s budget",
                f"{bd['max_ratio']:.2f}x",
                "<= 1.0x",
                _verdict(bd["max_ratio"], 1.0, higher_is_better=False),
            ]
        )
        rows.append(
            [
                "budget mean req/s",
                f"{bd['mean_rps']:.1f}/s",
                f"{b:.0f}/s budget",
                f"{bd['mean_ratio']:.2f}x",
                f">= {bd['target_mean_ratio']}x",
                _verdict(bd["mean_ratio"], bd["target_mean_ratio"], higher_is_better=True),
            ]
        )
        counts = {
            "active": bd["batches"] - bd["finished_batches"],
            "finished": bd["finished_batches"],
        }
        for group in ("active", "finished"):
            m = bd["metrics_interval_s"][group]
            w = bd["cycles_in_window"][group]
            measured = (
                f"{m['min']:.1f}/{m['median']:.1f}/{m['max']:.1f} s" if m["n"] else "no 2nd poll"
            )
            rows.append(
                [
                    f"budget interval {group} ({counts[group]})",
                    measured,
                    f"{bd['expected_active_interval_s']:.2f} s expected"
                    if group == "active"
                    else "",
                    f"{bd['active_interval_ratio']:.2f}x" if group == "active" else "",
                    f"{w['median']:.0f} polls/batch in {bd['window_s']:.0f} s",
                    "",
                ]
            )
    fo = results.get("failover")
    if fo:
        rows.append(
            [
                f"failover recovery ({fo['victim_batches']} batches)",
                f"{fo['recovery_s']:.2f} s",
                f"{fo['bound_s']:.2f} s TTL+sync",
                f"{fo['ratio_to_bound']:.2f}x",
                "<= 1.0x",
                _verdict(fo["ratio_to_bound"], 1.0, higher_is_better=False),
            ]
        )
        rows.append(
            [
                "failover recovery / TTL",
                f"{fo['recovery_s']:.2f} s",
                f"{fo['lease_ttl_s']:.0f} s TTL",
                f"{fo['ratio_to_ttl']:.2f}x",
                "",
                "",
            ]
        )
        rows.append(
            [
                "batches per replica",
                "/".join(str(c) for c in fo["split_before"])
                + " -> "
                + "/".join(str(c) for c in fo["split_after"]),
                "",
                "",
                "",
                "",
            ]
        )
        dl = fo["deliveries"]
        one, two = dl["replicas_1"]["per_s"], dl["replicas_2"]
        rows.append(["deliveries/s, 1 replica", f"{one:.0f}/s", "", "", "", ""])
        rows.append(
            [
                "deliveries/s, 2 replicas",
                f"{two['per_s']:.0f}/s ({two['per_s_per_replica']:.0f}/replica)",
                f"{one:.0f}/s 1 replica",
                f"{dl['scaling_2_vs_1']:.2f}x",
                "",
                "",
            ]
        )
    return rows


def print_table(rows: list[list[str]]) -> None:
    header = ["figure", "measured", "ceiling", "ratio", "target", ""]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


# -- plots -------------------------------------------------------------------------


def plot(results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    dlv = results.get("delivery")
    if dlv:
        cs = sorted(int(c) for c in dlv["concurrency"])
        fig, ax = plt.subplots(figsize=(7, 4.2))
        series = [("plain", "plain aiohttp POST (ceiling)", "o-")]
        series += [(m, f"signed durable deliveries ({m})", "s-") for m in delivery.SERVICE_MODES]
        for k, (mode, label, style) in enumerate(series):
            ys = [dlv["concurrency"][str(c)][mode]["per_s"] for c in cs]
            ax.plot(cs, ys, style, label=label)
            for c, y in zip(cs, ys, strict=True):
                ratio = dlv["concurrency"][str(c)][mode].get("ratio")
                text = f"{y:.0f}/s" + (f" ({ratio:.2f}x)" if ratio is not None else "")
                # Service curves lie close together: alternate labels above and below.
                offset = (4, 6) if k % 2 else (4, -13)
                ax.annotate(text, (c, y), textcoords="offset points", xytext=offset, fontsize=8)
        plain = [dlv["concurrency"][str(c)]["plain"]["per_s"] for c in cs]
        ax.plot(
            cs,
            [dlv["target_ratio"] * p for p in plain],
            ":",
            color="grey",
            label=f"target: {dlv['target_ratio']}x plain",
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency (in-flight requests)")
        ax.set_ylabel("requests per second")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Delivery throughput, {dlv['n']} events, receiver in its own process")
        ax.legend(fontsize=8, loc="center right")
        fig.tight_layout()
        path = IMG / "delivery_throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(REPO)))

    poll = results.get("poll_cycle")
    if poll:
        names = list(poll["cases"])
        cases = [poll["cases"][n] for n in names]
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        xs = list(range(len(names)))
        w = 0.27
        cycle = [1000 * c["cycle_cpu_s"] for c in cases]
        loads = [1000 * c["ceiling_cpu_s"] for c in cases]
        fetch = [1000 * c["http_fetch_cpu_s"] for c in cases]
        ax.bar([x - w for x in xs], cycle, w, label="poll_once CPU")
        ax.bar(xs, loads, w, label="ceiling: orjson.loads of the 200 pages")
        ax.bar([x + w for x in xs], fetch, w, label="reference: plain aiohttp fetch of them")
        for x, c, y in zip(xs, cases, cycle, strict=True):
            ax.annotate(f"{c['ratio']:.1f}x", (x - w, y), ha="center", va="bottom", fontsize=8)
            if c["target_ratio"]:
                ax.plot(
                    [x - 1.5 * w, x + 1.5 * w],
                    [c["target_ratio"] * 1000 * c["ceiling_cpu_s"]] * 2,
                    "k:",
                )
        ax.set_yscale("log")
        ax.set_xticks(xs, [n.replace("_", "\n", 1) for n in names], fontsize=8)
        ax.set_ylabel("CPU ms (log scale)")
        ax.set_title("One poll cycle, 100,000 calls / 200 pages (dotted: target)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
        fig.tight_layout()
        path = IMG / "poll_cycle_cpu.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(REPO)))

        with_phases = [n for n in names if poll["cases"][n]["phases"]]
        if with_phases:
            fig, ax = plt.subplots(figsize=(8.5, 4.5))
            labels: list[str] = []
            for n in with_phases:
                for p in poll["cases"][n]["phases"]:
                    if p["within"] is None and p["phase"] not in labels:
                        labels.append(p["phase"])
            cmap = plt.get_cmap("tab20")
            for i, n in enumerate(with_phases):
                bottom = 0.0
                by = {p["phase"]: p for p in poll["cases"][n]["phases"] if p["within"] is None}
                for j, label in enumerate(labels):
                    ms = 1000 * by[label]["cpu_s"] if label in by else 0.0
                    ax.bar(
                        i,
                        ms,
                        0.6,
                        bottom=bottom,
                        color=cmap(j),
                        label=label if i == 0 else None,
                    )
                    bottom += ms
                ceiling = 1000 * poll["cases"][n]["ceiling_cpu_s"]
                ax.plot([i - 0.35, i + 0.35], [ceiling, ceiling], "k-", lw=2)
            ax.set_xticks(range(len(with_phases)), with_phases, fontsize=8)
            ax.set_ylabel("CPU ms of one instrumented cycle")
            ax.set_title("Where a poll cycle's CPU goes (black line: orjson.loads ceiling)")
            ax.legend(fontsize=7, loc="upper right")
            fig.tight_layout()
            path = IMG / "poll_cycle_phases.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path.relative_to(REPO)))
    written += _fleet_plots(results, plt)
    return written


def _fleet_plots(results: dict[str, Any], plt: Any) -> list[str]:
    written: list[str] = []
    lg = results.get("lag")
    if lg and lg.get("samples_ms"):
        xs = [v / 1000 for v in lg["samples_ms"]]
        n = len(xs)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        ax1.hist(xs, bins=60, color="tab:blue")
        ax1.set_xlabel("lag: status change upstream -> webhook received (s)")
        ax1.set_ylabel("events")
        ax1.set_title(f"{n} events, {lg['changes_per_s']:.0f} changes/s")
        ax2.plot(xs, [(i + 1) / n for i in range(n)], "-", color="tab:blue", label="lag CDF")
        iv = lg["interval_s"]
        ax2.axvline(iv, color="grey", ls=":", label=f"poll interval {iv:.1f} s")
        ax2.axvline(lg["target_p99_s"], color="tab:red", ls="--", label="target p99")
        for q in ("p50", "p95", "p99"):
            v = lg["lag"][f"{q}_s"]
            ax2.annotate(
                f"{q} {v:.2f} s",
                (v, {"p50": 0.5, "p95": 0.95, "p99": 0.99}[q]),
                textcoords="offset points",
                xytext=(-70, -4),
                fontsize=8,
            )
        for ax in (ax1, ax2):
            ax.axvline(iv, color="grey", ls=":")
        ax2.set_xlabel("lag (s)")
        ax2.set_ylabel("share of events")
        ax2.set_ylim(0, 1.02)
        ax2.legend(fontsize=8, loc="lower right")
        fig.suptitle("End-to-end lag (simulator -> callbridge run -> receiver, 3 processes)")
        fig.tight_layout()
        path = IMG / "lag.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(REPO)))

    sc = results.get("scale")
    if sc:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        groups = sc["groups"]
        for case, style in (("nochange", "o"), ("10pct", "s")):
            pts = sorted(
                (
                    (g["calls"], 1000 * g["cases"][case]["cpu_s"], name)
                    for name, g in groups.items()
                ),
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{case}")
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -3), fontsize=7)
            fit = sc["linearity"][case]["fit"]
            ref = [(x, fit["per_1k_calls_ms"] * x / 1000) for x in (1000, 100_000)]
            ax.plot([r[0] for r in ref], [r[1] for r in ref], ":", color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("calls polled in the cycle (batches x calls per batch)")
        ax.set_ylabel("CPU ms per cycle (bench process)")
        ax.set_title("Poll-cycle CPU vs calls (dotted: proportional, fitted cost per call)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = IMG / "scale.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(REPO)))

    bd = results.get("budget")
    if bd and bd.get("samples"):
        arr = bd["samples"]["arrivals_rel_s"]
        end = int(max(arr, default=0)) + 1
        counts = [0] * end
        for t in arr:
            counts[int(t)] += 1
        fig, ax = plt.subplots(figsize=(7.5, 3.6))
        ax.bar(range(end), counts, 0.9, align="edge", label="upstream requests per second")
        ax.axhline(bd["budget_rps"], color="tab:red", ls="--", label="budget")
        w0, w1 = bd["samples"]["window"]
        ax.axvspan(w0, w1, color="grey", alpha=0.15, label="measured window")
        ax.set_xlabel("seconds since the bridge started")
        ax.set_ylabel("requests")
        ax.set_title(
            f"{bd['batches']} batches x {bd['pages_per_cycle']} pages at 1 s want "
            f"{bd['demand_rps']:.0f} req/s; budget {bd['budget_rps']:.0f}/s"
        )
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = IMG / "budget.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path.relative_to(REPO)))
    return written


# -- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions, shorter runs (~2 min)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these benchmarks (repeat or comma-separate): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profiled and instrumented cycles"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the plots and the table from the existing results file",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "latest.json",
        help="results file (default bench/results/latest.json); plots only for the default",
    )
    args = parser.parse_args(argv)
    only = {n.strip() for item in args.only or [] for n in item.split(",") if n.strip()}
    if only - set(BENCHMARKS):
        parser.error(f"unknown benchmark(s): {', '.join(sorted(only - set(BENCHMARKS)))}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    latest: Path = args.output.resolve()
    is_default = latest == (RESULTS / "latest.json").resolve()
    results: dict[str, Any] = {}
    if args.replot:
        results = json.loads(latest.read_text())
        print_table(table_rows(results))
        print("wrote " + ", ".join(plot(results)))
        return 0
    if only and latest.exists():
        # Keep the other benchmarks' last figures, so the plots and table stay whole.
        results = json.loads(latest.read_text())
    started = time.perf_counter()
    results["machine"] = machine_info()
    results["code"] = code_version()
    results["mode"] = "quick" if args.quick else "full"
    results["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for name, fn in BENCHMARKS.items():
        if only and name not in only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = asyncio.run(fn(args.quick, not args.no_profile))
    results["elapsed_s"] = time.perf_counter() - started
    latest.write_text(json.dumps(results, indent=2, default=str) + "\n")
    written = plot(results) if is_default else []
    m = results["machine"]
    print(
        f"{m['nproc']} x {m['cpu_model']}, Python {m['python']}, "
        f"load {m['loadavg_at_start'][0]:.2f}, mode {results['mode']}, "
        f"{results['elapsed_s']:.0f} s"
    )
    print_table(table_rows(results))
    print(f"\nwrote {', '.join([str(latest), *written])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
