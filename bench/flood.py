"""A flood: 20,000 calls of one batch complete at one instant, through ``callbridge run``.

Processes besides Valkey, all on this machine and all stamping ``time.time()``:

* the simulator (``bench.sim_server``), one batch per repetition, every call
  ``in_progress`` before the bridge starts;
* the real bridge, ``callbridge run`` as a subprocess: the default config except
  the URLs, a 1 s poll interval and a request budget that never throttles (one
  cycle reads 40 pages of 500); one subscription (default ``max_in_flight``,
  ``global_max_in_flight``, timeouts) pointing at
* the receiver (``bench.receiver``, checks 1 signature in 50).

A repetition: the bridge polls the batch until it is steady (the 20,000 initial
``call.in_progress`` events delivered, then two unchanged cycles), the receiver's
counters are reset, and ``POST /_bench/switch`` turns every call ``completed`` in one
step. Measured at the receiver: webhooks/s from the first ``call.completed`` to the
last ((n - 1) / span), and the time from the switch to the first one, split into the
wait for the next poll (the first page request after the switch) and the rest.

Ceiling, in the same repetition: the same 20,000 bodies (read back from the
delivery records in Redis) POSTed by one process, 64 coroutines over one aiohttp
session, to the same receiver, rate measured the same way at the receiver.
Ratio = flood rate / plain rate; the median over the repetitions is reported.

With ``profile``, one more repetition runs with py-spy sampling the bridge process
while it holds the GIL (when ``py-spy`` is installed; it is not a project dependency)
and the top own-time functions are saved (``results/pyspy_flood.txt``, raw stacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.common import (
    RESULTS,
    SECRET,
    Bridge,
    Server,
    bridge_config,
    bridge_process,
    child_server,
    median,
    parse_metrics,
    valkey_server,
)
from bench.lag import _poll_times
from callbridge.store.keys import Keys

CALLS = 20_000
INTERVAL_S = 1.0
PLAIN_CONCURRENCY = 64
TARGET_RATIO = 0.6
GOAL_RATIO = 0.8
TARGET_FIRST_SLACK_S = 0.5
SUB = "crm"
RECEIVER_ARGS: list[str] = []


async def _json(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    async with session.request(method, url, **kw) as resp:
        resp.raise_for_status()
        return await resp.json()


async def _metric_total(
    session: aiohttp.ClientSession, bridge: Bridge, name: str, **labels: str
) -> float:
    async with session.get(bridge.url + "/metrics") as resp:
        samples = parse_metrics(await resp.text())
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )


async def _wait_received(
    session: aiohttp.ClientSession, receiver: Server, n: int, timeout_s: float
) -> dict[str, Any]:
    deadline = time.perf_counter() + timeout_s
    while True:
        stats: dict[str, Any] = await _json(session, "GET", receiver.url + "/_stats")
        if stats["distinct_ids"] >= n or time.perf_counter() > deadline:
            return stats
        await asyncio.sleep(0.05)


async def _wait_steady(session: aiohttp.ClientSession, bridge: Bridge, receiver: Server) -> float:
    """The initial events delivered, then two unchanged cycles; returns the seconds taken."""
    t0 = time.perf_counter()
    stats = await _wait_received(session, receiver, CALLS, 180)
    if stats["distinct_ids"] < CALLS:
        raise RuntimeError(f"warm-up: only {stats['distinct_ids']} of {CALLS} initial events")
    name = "callbridge_poll_cycles_total"
    base = await _metric_total(session, bridge, name, outcome="unchanged")
    while await _metric_total(session, bridge, name, outcome="unchanged") < base + 2:
        if time.perf_counter() - t0 > 240:
            raise RuntimeError("warm-up: the bridge never had two unchanged cycles")
        await asyncio.sleep(0.1)
    return time.perf_counter() - t0


async def _completed_bodies(redis_url: str) -> list[bytes]:
    """The exact bodies of the flood's deliveries, from their records in Redis."""
    client: Any = aioredis.Redis.from_url(redis_url)
    bodies: list[bytes] = []
    try:
        pattern = Keys().record_prefix(SUB) + "*"
        keys = [k async for k in client.scan_iter(match=pattern, count=2000)]
        async with client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hmget(k, "type", "body")
            rows = await pipe.execute()
        bodies = [body for etype, body in rows if etype == b"call.completed" and body]
    finally:
        await client.aclose()
    return bodies


async def plain(receiver: Server, bodies: list[bytes]) -> dict[str, Any]:
    """The ceiling: the bodies POSTed by 64 coroutines of one session, measured at the receiver."""
    hook = receiver.url + "/hook"
    headers = {"Content-Type": "application/json"}
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
    )
    it = iter(bodies)
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for body in it:
            async with session.post(hook, data=body, headers=headers) as resp:
                await resp.read()
                ok += resp.status == 200

    try:
        await _json(session, "POST", receiver.url + "/_reset")
        c0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(PLAIN_CONCURRENCY)))
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        stats = await _json(session, "GET", receiver.url + "/_stats")
    finally:
        await session.close()
    span = stats["last_any_at"] - stats["first_any_at"]
    return {
        "posted": len(bodies),
        "ok": ok,
        "span_s": span,
        "per_s": (stats["requests"] - 1) / span if span > 0 else float("nan"),
        "bench_wall_s": wall,
        "bench_per_s": ok / wall if wall > 0 else float("nan"),
        "cpu_ms_per_post": 1000 * cpu / max(1, ok),
    }


@contextlib.contextmanager
def _py_spy(pid: int, label: str) -> Any:
    """py-spy sampling `pid` (raw collapsed stacks), when installed; else nothing."""
    exe = shutil.which("py-spy")
    path = RESULTS / f"pyspy_{label}.txt"
    out: dict[str, Any] = {}
    if exe is None:
        yield out
        return
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            # Only while it holds the GIL: Python's own CPU, not the time in
            # system calls or waiting for the next event.
            "--gil",
            "--output",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attached before the work starts
    try:
        yield out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if path.exists():
            out.update(own_time_top(path))


def _committed_at(log_name: str, after: float) -> float:
    """When the bridge logged its first commit after `after` (its log's local time)."""
    path = RESULTS / f"{log_name}.log"
    for line in path.read_text().splitlines():
        if "action=cycle_committed" not in line:
            continue
        stamp, ms = line[:23].split(",")
        t = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
        if t >= after:
            return t
    return float("nan")


def own_time_top(path: Path, n: int = 20) -> dict[str, Any]:
    """Top functions by own samples from py-spy's raw output (``frames;... count``)."""
    own: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        leaf = stack.rsplit(";", 1)[-1]
        # "func (path/to/file.py:123)" -> "func (file.py)"
        func, _, where = leaf.partition(" (")
        file = where.rstrip(")").rsplit(":", 1)[0].rsplit("/", 1)[-1]
        own[f"{func} ({file})"] += count
        by_module[_module_of(where)] += count
        total += count
    return {
        "file": str(path),
        "samples": total,
        "top_own": [
            {"function": f, "samples": c, "share": c / total} for f, c in own.most_common(n)
        ],
        "by_package": [
            {"package": m, "samples": c, "share": c / total} for m, c in by_module.most_common(12)
        ],
    }


def _module_of(where: str) -> str:
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/callbridge/", "lib/python3"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            head = rest.split("/", 1)[0]
            if marker == "/callbridge/":
                return "callbridge/" + head
            if marker == "lib/python3":
                return "stdlib/" + (rest.split("/", 2)[1] if "/" in rest else rest)
            return head
    return path.rsplit("/", 1)[-1] or "?"


async def one_flood(
    session: aiohttp.ClientSession,
    valkey: Server,
    sim: Server,
    receiver: Server,
    batch_id: str,
    rep: int,
    *,
    profile: bool,
    sub_extra: dict[str, Any] | None = None,
    delivery: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    tracing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`env`: for the bridge process (`bridge_process`); `tracing`: its config section."""
    sub_extra = sub_extra or {}
    flush: Any = aioredis.Redis.from_url(valkey.url)
    try:
        await flush.execute_command("FLUSHDB", "SYNC")
    finally:
        await flush.aclose()
    await _json(
        session,
        "POST",
        sim.url + "/_bench/switch",
        params={"status": "in_progress", "batch": batch_id},
    )
    await _json(session, "POST", receiver.url + "/_reset")
    config = bridge_config(
        sim.url,
        valkey.url,
        batches=[batch_id],
        subscriptions=[{"name": SUB, "url": receiver.url + "/hook", "secret": SECRET, **sub_extra}],
        poller={"interval_seconds": INTERVAL_S},
        delivery=delivery or {},
        **({"tracing": tracing} if tracing else {}),
    )
    label = f"flood_{rep}" + ("_profiled" if profile else "")
    with bridge_process(config, f"bridge_{label}", env) as bridge:
        warmup_s = await _wait_steady(session, bridge, receiver)
        await _json(session, "POST", receiver.url + "/_reset")
        stats_client: Any = aioredis.Redis.from_url(valkey.url)
        await stats_client.config_resetstat()
        with _py_spy(bridge.pid, "flood") if profile else contextlib.nullcontext({}) as spy:
            cpu0 = (bridge.cpu_s(), valkey.cpu_s(), receiver.cpu_s(), sim.cpu_s())
            load = os.getloadavg()[0]
            switched = await _json(
                session,
                "POST",
                sim.url + "/_bench/switch",
                params={"status": "completed", "batch": batch_id},
            )
            at = float(switched["at"])
            stats = await _wait_received(session, receiver, CALLS, 120)
            cpu1 = (bridge.cpu_s(), valkey.cpu_s(), receiver.cpu_s(), sim.cpu_s())
        # Where Valkey's time goes: its own per-command accounting (commands run by
        # scripts are counted under their names too; `evalsha` includes them).
        commandstats = {
            name.removeprefix("cmdstat_"): {"calls": v["calls"], "usec": v["usec"]}
            for name, v in (await stats_client.info("commandstats")).items()
        }
        await stats_client.aclose()
        requests = await _json(
            session, "GET", sim.url + "/_bench/requests", params={"since": str(at)}
        )
        cycles = await _metric_total(
            session, bridge, "callbridge_poll_cycles_total", outcome="committed"
        )
    n = stats["distinct_ids"]
    span = stats["last_at"] - stats["first_at"]
    committed = _committed_at(f"bridge_{label}", at)
    polls = _poll_times(requests).get(batch_id, [])
    first_poll = polls[0] if polls else float("nan")
    wall = stats["last_at"] - at
    out: dict[str, Any] = {
        "rep": rep,
        "loadavg_1m": load,
        "warmup_s": warmup_s,
        "delivered": n,
        "signed": stats["signed"],
        "verified": stats["verified"],
        "bad_signatures": stats["bad_signatures"],
        "span_s": span,
        "per_s": (n - 1) / span if span > 0 else float("nan"),
        "first_after_switch_s": stats["first_at"] - at,
        "first_poll_after_switch_s": first_poll - at,
        "poll_to_first_webhook_s": stats["first_at"] - first_poll,
        # The cycle (pages, diff, commit) and the rest (fan-out, claim, first POST).
        "poll_to_commit_s": committed - first_poll,
        "commit_to_first_webhook_s": stats["first_at"] - committed,
        "last_after_switch_s": wall,
        "committed_cycles": cycles,
        "valkey_commandstats": commandstats,
        "cpu_s": {
            "bridge": cpu1[0] - cpu0[0],
            "valkey": cpu1[1] - cpu0[1],
            "receiver": cpu1[2] - cpu0[2],
            "simulator": cpu1[3] - cpu0[3],
        },
        "bridge_cpu_ms_per_webhook": 1000 * (cpu1[0] - cpu0[0]) / max(1, n),
    }
    if n < CALLS:
        out["incomplete"] = True
    if profile:
        out["profile"] = spy
    bodies = await _completed_bodies(valkey.url)
    out["plain"] = await plain(receiver, bodies)
    out["ratio"] = out["per_s"] / out["plain"]["per_s"]
    return out


async def run(
    quick: bool = False, profile: bool = True, *, sub_extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`sub_extra`: subscription settings other than the defaults (for experiments)."""
    reps = 1 if quick else 3
    batches = reps + (1 if profile else 0)
    started = time.perf_counter()
    with (
        valkey_server() as valkey,
        child_server(
            "bench.sim_server", ["--layout", f"{batches}x{CALLS}"], "sim_server_flood"
        ) as sim,
        child_server(
            "bench.receiver", ["--verify-every", "50", *RECEIVER_ARGS], "receiver_flood"
        ) as receiver,
    ):
        async with aiohttp.ClientSession() as session:
            info = await _json(session, "GET", sim.url + "/_bench/info")
            batch_ids: list[str] = info["batch_ids"]
            runs = [
                await one_flood(
                    session,
                    valkey,
                    sim,
                    receiver,
                    batch_ids[i],
                    i,
                    profile=False,
                    sub_extra=sub_extra,
                )
                for i in range(reps)
            ]
            profiled = None
            if profile:
                profiled = await one_flood(
                    session,
                    valkey,
                    sim,
                    receiver,
                    batch_ids[reps],
                    reps,
                    profile=True,
                    sub_extra=sub_extra,
                )
    ratios = [r["ratio"] for r in runs]
    firsts = [r["first_after_switch_s"] for r in runs]
    mid = sorted(runs, key=lambda r: r["ratio"])[len(runs) // 2]
    return {
        "calls": CALLS,
        "interval_s": INTERVAL_S,
        "plain_concurrency": PLAIN_CONCURRENCY,
        "target_ratio": TARGET_RATIO,
        "goal_ratio": GOAL_RATIO,
        "target_first_s": INTERVAL_S + TARGET_FIRST_SLACK_S,
        "ratio": median(ratios),
        "ratio_samples": ratios,
        "per_s": mid["per_s"],
        "plain_per_s": mid["plain"]["per_s"],
        "first_after_switch_s": median(firsts),
        "first_samples_s": firsts,
        "runs": runs,
        "profiled_run": profiled,
        "elapsed_s": time.perf_counter() - started,
    }
