"""The delivery's two HTTP clients (``delivery.http_client``), interleaved in one run.

``python -m bench.clients [--reps 3] [--only sender,delivery,flood]``

The machine is shared and noisy, so the clients are compared in one process,
alternately, against the same Valkey, receiver and simulator, with the order
swapped every repetition:

* ``delivery`` (`bench.delivery`, mode ``loops``, C = 16 and 64): per repetition and
  C, the plain-POST ceiling before and after the two service runs; ratio = deliveries/s
  ÷ the mean of the two ceilings. CPU per delivery of the bench process, Valkey and
  the receiver (the last two from /proc).
* ``flood`` (`bench.flood`): one flood per client and repetition, each with its own
  ceiling (64 aiohttp coroutines POSTing the same bodies right after it).
* ``sender``: `WebhookSender.send` alone (signing, the POST, the classified result;
  no Redis, no loop), 64 coroutines, next to the plain POSTs: CPU per request.

Writes ``bench/results/clients.json`` and prints the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import aiohttp

from bench import flood
from bench.common import (
    RESULTS,
    SECRET,
    child_server,
    machine_info,
    make_settings,
    median,
    valkey_server,
)
from bench.delivery import Bench, make_events
from bench.run import code_version
from callbridge.config import SubscriptionSettings
from callbridge.deliver.http1 import Http1Pool
from callbridge.deliver.sender import WebhookSender
from callbridge.models import Event

CLIENTS = ("aiohttp", "lean")
_PLAIN_HEADERS = {"Content-Type": "application/json"}
_SENDER_FIELDS = ("per_s", "cpu_ms", "receiver_cpu_ms", "loadavg_1m")
CONCURRENCIES = (16, 64)


def _mean(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return (float(a[key]) + float(b[key])) / 2


def _order(rep: int) -> tuple[str, ...]:
    return CLIENTS if rep % 2 == 0 else CLIENTS[::-1]


async def deliveries(reps: int) -> list[dict[str, Any]]:
    n, budget, min_plain = 5_000, 12.0, 1.5
    events = make_events(n)
    samples: list[dict[str, Any]] = []
    with (
        valkey_server() as valkey,
        child_server("bench.receiver", ["--verify-every", "50"], "receiver_clients") as receiver,
    ):
        benches = {c: Bench(valkey, receiver, events, delivery={"http_client": c}) for c in CLIENTS}
        try:
            for rep in range(reps):
                for conc in CONCURRENCIES:
                    load = os.getloadavg()[0]
                    before = await benches["aiohttp"].plain(conc, budget, min_plain)
                    runs = {
                        c: await benches[c].service_run("loops", conc, budget) for c in _order(rep)
                    }
                    after = await benches["aiohttp"].plain(conc, budget, min_plain)
                    plain = (before["per_s"] + after["per_s"]) / 2
                    for client, r in runs.items():
                        samples.append(
                            {
                                "rep": rep,
                                "c": conc,
                                "client": client,
                                "first": client == _order(rep)[0],
                                "loadavg_1m": load,
                                "per_s": r["per_s"],
                                "delivered": r["delivered"],
                                "plain_per_s": plain,
                                "ratio": r["per_s"] / plain,
                                "cpu_ms": r["cpu_ms_per_delivery"],
                                "valkey_cpu_ms": r["valkey_cpu_ms_per_delivery"],
                                "receiver_cpu_ms": r["receiver_cpu_ms_per_delivery"],
                                "plain_cpu_ms": _mean(before, after, "cpu_ms_per_delivery"),
                                "plain_receiver_cpu_ms": _mean(
                                    before, after, "receiver_cpu_ms_per_delivery"
                                ),
                                "bad_signatures": r["receiver"]["bad_signatures"],
                            }
                        )  # fmt: skip
                    print(_line(samples[-2:]), flush=True)
        finally:
            for b in benches.values():
                await b.redis.aclose()
    return samples


async def _send_all(
    mode: str, sub: SubscriptionSettings, events: list[Event]
) -> tuple[int, float, float]:
    """Every event sent once by 64 coroutines: (2xx answers, CPU s, wall s)."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    )
    sender = WebhookSender(session, pool=Http1Pool() if mode == "lean" else None)
    keys, url = sub.signing_keys, sub.url.unicode_string()
    it = iter(events)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for ev in it:
            if mode == "plain":
                async with session.post(url, data=ev.body, headers=_PLAIN_HEADERS) as resp:
                    await resp.read()
                    ok += resp.status == 200
            else:
                # Awaited first: `ok += await ...` would read `ok` before the await.
                result = await sender.send(sub, keys, ev.id, ev.body)
                ok += result.ok

    try:
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(64)))
        return ok, time.process_time() - c0, time.perf_counter() - w0
    finally:
        await sender.close()
        await session.close()


async def senders(reps: int) -> list[dict[str, Any]]:
    events = make_events(5_000)
    samples: list[dict[str, Any]] = []
    with child_server("bench.receiver", ["--verify-every", "50"], "receiver_senders") as rec:
        sub = make_settings(
            "http://127.0.0.1:9",
            "redis://127.0.0.1:1",
            subscriptions=[{"name": "crm", "url": rec.url + "/hook", "secret": SECRET}],
        ).subscriptions[0]
        for rep in range(reps):
            for mode in ("plain", *_order(rep)):
                load = os.getloadavg()[0]
                r0 = rec.cpu_s()
                ok, cpu, wall = await _send_all(mode, sub, events)
                receiver = rec.cpu_s() - r0
                samples.append(
                    {
                        "rep": rep,
                        "client": mode,
                        "loadavg_1m": load,
                        "per_s": ok / wall,
                        "cpu_ms": 1000 * cpu / max(1, ok),
                        "receiver_cpu_ms": 1000 * receiver / max(1, ok),
                    }
                )
                print(
                    f"sender {mode:7s} {ok / wall:6.0f}/s cpu {1000 * cpu / max(1, ok):.4f} ms "
                    f"receiver {1000 * receiver / max(1, ok):.3f} ms load {load:.1f}",
                    flush=True,
                )
    return samples


async def floods(reps: int) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    layout = f"{reps * len(CLIENTS)}x{flood.CALLS}"
    with (
        valkey_server() as valkey,
        child_server("bench.sim_server", ["--layout", layout], "sim_server_clients") as sim,
        child_server("bench.receiver", ["--verify-every", "50"], "receiver_clients_flood") as rec,
    ):
        async with aiohttp.ClientSession() as session:
            info = await flood._json(session, "GET", sim.url + "/_bench/info")
            batch_ids: list[str] = info["batch_ids"]
            i = 0
            for rep in range(reps):
                for client in _order(rep):
                    r = await flood.one_flood(
                        session, valkey, sim, rec, batch_ids[i], 100 + i, profile=False,
                        delivery={"http_client": client},
                    )  # fmt: skip
                    i += 1
                    n = max(1, r["delivered"])
                    samples.append(
                        {
                            "rep": rep,
                            "client": client,
                            "loadavg_1m": r["loadavg_1m"],
                            "per_s": r["per_s"],
                            "plain_per_s": r["plain"]["per_s"],
                            "ratio": r["ratio"],
                            "delivered": r["delivered"],
                            "bad_signatures": r["bad_signatures"],
                            "first_after_switch_s": r["first_after_switch_s"],
                            "cpu_ms": r["bridge_cpu_ms_per_webhook"],
                            "valkey_cpu_ms": 1000 * r["cpu_s"]["valkey"] / n,
                            "receiver_cpu_ms": 1000 * r["cpu_s"]["receiver"] / n,
                        }
                    )
                    print(_line(samples[-1:]), flush=True)
    return samples


def _line(samples: list[dict[str, Any]]) -> str:
    return "  ".join(
        f"{s['client']:7s} c={s.get('c', 'flood')} {s['per_s']:6.0f}/s ratio {s['ratio']:.2f} "
        f"cpu {s['cpu_ms']:.3f} valkey {s['valkey_cpu_ms']:.3f} recv {s['receiver_cpu_ms']:.3f} "
        f"load {s['loadavg_1m']:.1f}"
        for s in samples
    )


def summary(samples: list[dict[str, Any]], key: str | None) -> dict[str, Any]:
    """Medians per client (and C), and how many repetitions the lean client won."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for s in samples:
        groups.setdefault(str(s.get(key, "flood")) if key else "flood", {}).setdefault(
            s["client"], []
        ).append(s)
    out: dict[str, Any] = {}
    for g, by_client in groups.items():
        row: dict[str, Any] = {}
        for client, ss in by_client.items():
            row[client] = {
                f: median([s[f] for s in ss])
                for f in ("ratio", "per_s", "plain_per_s", "cpu_ms", "valkey_cpu_ms",
                          "receiver_cpu_ms", "loadavg_1m")
            }  # fmt: skip
            row[client]["ratio_samples"] = [round(s["ratio"], 3) for s in ss]
        pairs = zip(by_client.get("lean", []), by_client.get("aiohttp", []), strict=False)
        row["lean_better_pairs"] = sum(a["ratio"] > b["ratio"] for a, b in pairs)
        out[g] = row
    return out


async def main(reps: int, parts: list[str]) -> None:
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "code": code_version(), "reps": reps}
    if "delivery" in parts:
        results["delivery_samples"] = await deliveries(reps)
        results["delivery"] = summary(results["delivery_samples"], "c")
    if "sender" in parts:
        results["sender_samples"] = s = await senders(reps)
        results["sender"] = {
            mode: {f: median([x[f] for x in s if x["client"] == mode]) for f in _SENDER_FIELDS}
            for mode in ("plain", *CLIENTS)
        }
        print(json.dumps(results["sender"], indent=1))
    if "flood" in parts:
        results["flood_samples"] = await floods(reps)
        results["flood"] = summary(results["flood_samples"], None)
    results["loadavg_at_end"] = list(os.getloadavg())
    results["elapsed_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "clients.json").write_text(json.dumps(results, indent=1))
    for part in ("delivery", "flood"):
        for g, row in results.get(part, {}).items():
            for client in CLIENTS:
                m = row[client]
                print(
                    f"{part} {g:5s} {client:7s} ratio {m['ratio']:.2f} {m['per_s']:6.0f}/s "
                    f"(plain {m['plain_per_s']:6.0f}/s) cpu {m['cpu_ms']:.3f} ms, valkey "
                    f"{m['valkey_cpu_ms']:.3f}, receiver {m['receiver_cpu_ms']:.3f}; "
                    f"samples {m['ratio_samples']}"
                )
            print(f"{part} {g:5s} lean better in {row['lean_better_pairs']} of {reps} pairs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="sender,delivery,flood")
    ns = parser.parse_args()
    asyncio.run(main(ns.reps, ns.only.split(",")))
