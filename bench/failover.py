"""Lease failover across replicas, and what one replica carries when scaling out.

Failover: three ``callbridge run`` replicas (subprocesses) share one Valkey and
poll 30 batches (``lease_ttl_seconds`` 5, poll interval 1 s). Replicas are started
one at a time; each one's id is the member it adds to the heartbeat set
(``cb:replicas``), and a lease's owner is its token up to the last ``:``
(``<replica id>:<nonce>``). Once every batch is owned and the split is even, the
replica owning the most batches is SIGKILLed (no release, as in a crash). The
bench then reads every lease key (``cb:{b:<id>}:lease``) every 50 ms:

* recovery = time from the kill until the last of its batches has a live owner;
  compared with ``lease_ttl_seconds`` and with the documented bound, lease TTL +
  one sync period (TTL / 3);
* the lease TTL each of those batches still had at the kill (``PTTL``), so the
  pick-up delay after expiry is visible;
* the split after rebalancing over the two survivors.

While the three replicas are balanced and idle-ish (nothing changes upstream),
their CPU and Valkey's command rate are sampled for a few seconds (a steady-state
cost of running replicas).

Deliveries per replica: the same N signed ``call.completed`` deliveries as
``bench.delivery`` are enqueued into one subscription queue (``DeliveryQueue.enqueue``
from this process), and 1, then 2, ``callbridge run`` replicas with no batches
deliver them to ``bench.receiver`` (``delivery.global_max_in_flight`` 64 per replica,
the subscription's fleet-wide ``max_in_flight`` 128, so each replica can keep 64 in
flight). Rate = deliveries / (last - first receive
time at the receiver); the 2-replica figure is reported against the 1-replica one
measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.common import (
    SECRET,
    Bridge,
    bridge_config,
    bridge_process,
    child_server,
    median,
    valkey_server,
)
from bench.delivery import make_events
from callbridge.config import RedisSettings
from callbridge.store.connection import connect
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue

REPLICAS = 3
BATCHES = 30
CALLS = 50
LEASE_TTL_S = 5.0
SUB = "crm"
KEYS = Keys()


async def owners(r: Any, batch_ids: list[str]) -> dict[str, str | None]:
    """batch -> replica id owning its lease (None: no lease)."""
    tokens = await r.mget([KEYS.lease(b) for b in batch_ids])
    return {
        b: (t.decode().rsplit(":", 1)[0] if t else None)
        for b, t in zip(batch_ids, tokens, strict=True)
    }


def split(own: dict[str, str | None], live: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(live, 0)
    for rid in own.values():
        if rid in counts:
            counts[rid] += 1
    return counts


async def wait_balanced(
    r: Any, batch_ids: list[str], live: list[str], within_s: float, stable_s: float = 1.0
) -> tuple[float, dict[str, int]]:
    """Until every batch is owned by a live replica, evenly (max - min <= 1), for `stable_s`."""
    t0 = time.monotonic()
    since: float | None = None
    while time.monotonic() - t0 < within_s:
        own = await owners(r, batch_ids)
        counts = split(own, live)
        ok = sum(counts.values()) == len(batch_ids) and (
            max(counts.values()) - min(counts.values()) <= 1
        )
        if ok:
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= stable_s:
                return since - t0, counts
        else:
            since = None
        await asyncio.sleep(0.05)
    raise RuntimeError(f"leases not balanced over {len(live)} replicas within {within_s:.0f}s")


async def new_replica_id(r: Any, known: set[bytes], within_s: float = 30) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        members = set(await r.zrange(KEYS.replicas(), 0, -1))
        fresh = members - known
        if fresh:
            return fresh.pop().decode()
        await asyncio.sleep(0.05)
    raise RuntimeError("a started replica never sent its heartbeat")


async def commandstats(r: Any) -> dict[str, int]:
    info = await r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def failover(quick: bool, sim_url: str, valkey_url: str, batch_ids: list[str]) -> dict:
    r: Any = aioredis.Redis.from_url(valkey_url)
    config = bridge_config(
        sim_url,
        valkey_url,
        batches=batch_ids,
        poller={"interval_seconds": 1.0, "lease_ttl_seconds": LEASE_TTL_S},
        logging={"level": "INFO"},
    )
    out: dict[str, Any] = {"replicas": REPLICAS, "batches": BATCHES, "lease_ttl_s": LEASE_TTL_S}
    try:
        with contextlib.ExitStack() as stack:
            replicas: dict[str, Bridge] = {}
            for i in range(REPLICAS):
                known = set(await r.zrange(KEYS.replicas(), 0, -1))
                bridge = stack.enter_context(bridge_process(config, f"bridge_failover_{i}"))
                replicas[await new_replica_id(r, known)] = bridge
            live = list(replicas)
            took, counts = await wait_balanced(r, batch_ids, live, within_s=60)
            out["balance_after_last_start_s"] = took
            out["split_before"] = sorted(counts.values(), reverse=True)

            # Steady state: three balanced replicas, nothing changing upstream.
            sample_s = 2.0 if quick else 4.0
            cpu0 = {rid: b.cpu_s() for rid, b in replicas.items()}
            cmd0 = await commandstats(r)
            await asyncio.sleep(sample_s)
            cpu1 = {rid: b.cpu_s() for rid, b in replicas.items()}
            cmd1 = await commandstats(r)
            per_s = {k: (v - cmd0.get(k, 0)) / sample_s for k, v in cmd1.items()}
            out["steady_state"] = {
                "seconds": sample_s,
                "replica_cpu_share": [(cpu1[k] - cpu0[k]) / sample_s for k in replicas],
                "valkey_commands_per_s": {
                    k: v for k, v in sorted(per_s.items(), key=lambda kv: -kv[1]) if v >= 1
                },
                "poll_cycles_per_s_expected": BATCHES / 1.0,
            }

            victim = max(counts, key=lambda k: counts[k])
            own = await owners(r, batch_ids)
            lost = [b for b, rid in own.items() if rid == victim]
            pipe = r.pipeline()
            for b in lost:
                pipe.pttl(KEYS.lease(b))
            remaining = [max(0, int(v)) / 1000 for v in await pipe.execute()]
            t_kill = time.monotonic()
            replicas[victim].proc.send_signal(signal.SIGKILL)
            replicas[victim].proc.wait(10)
            survivors = [rid for rid in live if rid != victim]
            recovered: dict[str, float] = {}
            deadline = t_kill + 3 * LEASE_TTL_S + 15
            while len(recovered) < len(lost) and time.monotonic() < deadline:
                own = await owners(r, lost)
                now = time.monotonic() - t_kill
                for b, rid in own.items():
                    if b not in recovered and rid in survivors:
                        recovered[b] = now
                await asyncio.sleep(0.05)
            if len(recovered) < len(lost):
                raise RuntimeError(f"{len(lost) - len(recovered)} batches were never taken over")
            took, counts = await wait_balanced(r, batch_ids, survivors, within_s=60)
            rec = sorted(recovered.values())
            bound = LEASE_TTL_S + LEASE_TTL_S / 3
            out.update(
                {
                    "victim_batches": len(lost),
                    "lease_remaining_at_kill_s": {"min": min(remaining), "max": max(remaining)},
                    "recovery_s": max(rec),
                    "recovery_median_s": median(rec),
                    "recovery_first_s": min(rec),
                    "pickup_after_expiry_s": [
                        recovered[b] - rem for b, rem in zip(lost, remaining, strict=True)
                    ],
                    "ratio_to_ttl": max(rec) / LEASE_TTL_S,
                    "bound_s": bound,
                    "ratio_to_bound": max(rec) / bound,
                    "rebalanced_after_kill_s": took,
                    "split_after": sorted(counts.values(), reverse=True),
                    "batches_per_replica_after": median([float(v) for v in counts.values()]),
                }
            )
    finally:
        await r.aclose()
    return out


async def deliveries(quick: bool, valkey_url: str, receiver_url: str) -> dict[str, Any]:
    n = 3_000 if quick else 8_000
    events = make_events(n)
    r: Any = aioredis.Redis.from_url(valkey_url)
    queue = DeliveryQueue(connect(valkey_url, RedisSettings(url=valkey_url)), KEYS)
    config = bridge_config(
        "http://127.0.0.1:9",
        valkey_url,
        subscriptions=[
            {
                "name": SUB,
                "url": receiver_url + "/hook",
                "secret": SECRET,
                "events": ["*"],
                # The subscription's fleet-wide cap is twice a replica's own cap, so a
                # second replica can add in-flight requests instead of sharing 64.
                "max_in_flight": 128,
                "timeout_seconds": 10,
            }
        ],
        delivery={"global_max_in_flight": 64},
        logging={"level": "WARNING"},
    )
    out: dict[str, Any] = {"n": n, "subscription_max_in_flight": 128, "global_max_in_flight": 64}
    try:
        async with aiohttp.ClientSession() as session:
            for count in (1, 2):
                await r.execute_command("FLUSHDB", "SYNC")
                with contextlib.ExitStack() as stack:
                    procs = [
                        stack.enter_context(bridge_process(config, f"bridge_deliver_{count}_{i}"))
                        for i in range(count)
                    ]
                    async with session.post(receiver_url + "/_reset") as resp:
                        resp.raise_for_status()
                    cpu0 = [p.cpu_s() for p in procs]
                    now_ms = int(time.time() * 1000)
                    for i in range(0, n, 500):
                        await queue.enqueue(SUB, [(ev, now_ms) for ev in events[i : i + 500]])
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline:
                        async with session.get(receiver_url + "/_stats") as resp:
                            stats = await resp.json()
                        if stats["distinct_ids"] >= n:
                            break
                        await asyncio.sleep(0.1)
                    cpu1 = [p.cpu_s() for p in procs]
                wall = max(1e-9, stats["last_at"] - stats["first_at"])
                out[f"replicas_{count}"] = {
                    "delivered": stats["distinct_ids"],
                    "requests": stats["requests"],
                    "bad_signatures": stats["bad_signatures"],
                    "wall_s": wall,
                    "per_s": (stats["distinct_ids"] - 1) / wall,
                    "per_s_per_replica": (stats["distinct_ids"] - 1) / wall / count,
                    # Includes start-up idle time: an upper bound of the CPU share.
                    "replica_cpu_s": [b - a for a, b in zip(cpu0, cpu1, strict=True)],
                }
    finally:
        await queue._redis.aclose()
        await r.aclose()
    one, two = out["replicas_1"]["per_s"], out["replicas_2"]["per_s"]
    out["scaling_2_vs_1"] = two / one
    return out


async def run(quick: bool = False, profile: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    with (
        valkey_server() as valkey,
        child_server(
            "bench.sim_server", ["--layout", f"{BATCHES}x{CALLS}"], "sim_server_failover"
        ) as sim,
    ):
        async with aiohttp.ClientSession() as session, session.get(sim.url + "/_bench/info") as rs:
            batch_ids: list[str] = (await rs.json())["batch_ids"]
        result = await failover(quick, sim.url, valkey.url, batch_ids)
    with (
        valkey_server() as valkey,
        child_server("bench.receiver", [], "receiver_failover") as receiver,
    ):
        result["deliveries"] = await deliveries(quick, valkey.url, receiver.url)
    result["elapsed_s"] = time.perf_counter() - started
    return result
