"""CPU of one poll cycle against the number of calls: does it scale linearly?

Setup as in ``bench.poll_cycle``: a real Valkey server and the simulator in their own
processes, the Bridge wired by `Bridge.create` with one subscription (events are
enqueued, nobody delivers them), and the bench process's ``time.process_time()``
around the cycle. The simulator serves groups of batches (``--layout``):

    1 x 1,000   1 x 5,000   1 x 10,000   10 x 1,000   100 x 1,000   (batches x calls)

A "cycle" of a group is one `Poller.poll_once` of each of its batches, one after
the other (groups under 10,000 calls average several cycles per sample, so that
every sample is at least a few ms of CPU). Each group first gets a cold cycle
(reported, not part of the check), then, repeated:

* ``nochange``: nothing changed upstream;
* ``10pct``: 10% of every batch's calls changed (half a status step, half a field).

Figures: CPU per cycle, CPU per 1,000 calls, and the ratio to the same ceiling as
``poll_cycle`` (``orjson.loads`` of the group's page bodies, fetched right after the
cycle, same process). Linear scaling means CPU per 1,000 calls is the same for every
group: the check is max/min of it over the groups (<= 1.5). A least-squares fit
``cpu = a * batches + b * calls`` separates the fixed cost of a batch's cycle from the
cost per call.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.common import (
    API_KEY,
    SECRET,
    child_server,
    make_settings,
    median,
    valkey_server,
)
from callbridge.app import Bridge
from callbridge.constants import UPSTREAM_CALLS_PATH

PAGE_SIZE = 500
CHANGE_RATIO = 0.1
FULL_LAYOUT = "1x1000,1x5000,1x10000,10x1000,100x1000"
QUICK_LAYOUT = "1x1000,1x10000,10x1000"
TARGET_SPREAD = 1.5
CASES = ("nochange", "10pct")
MIN_CALLS_PER_SAMPLE = 10_000


class Bench:
    def __init__(self, sim_url: str, redis_url: str) -> None:
        self.sim_url = sim_url
        self.settings = make_settings(
            sim_url,
            redis_url,
            subscriptions=[
                {
                    "name": "crm",
                    "url": "http://127.0.0.1:9/hook",  # never contacted
                    "secret": SECRET,
                    "events": ["*"],
                }
            ],
            # Full scans, as poll_cycle: under `auto` the 10 % cycles read only the
            # active lists, and a per-1,000-calls figure then measures the planner.
            poller={"scan": "full"},
        )
        self.http = aiohttp.ClientSession()
        self.redis: Any = aioredis.Redis.from_url(redis_url)
        self.svc: Bridge | None = None
        self.round = 0

    async def close(self) -> None:
        if self.svc is not None:
            await self.svc.close()
        await self.http.close()
        await self.redis.aclose()

    async def start(self) -> Bridge:
        await self.redis.execute_command("FLUSHDB", "SYNC")
        self.svc = await Bridge.create(self.settings, replica_id="bench")
        return self.svc

    async def cycle(self, batch_ids: list[str]) -> tuple[float, float, list[str]]:
        """CPU and wall seconds of one poll_once per batch, and the outcomes."""
        assert self.svc is not None
        gc.collect()
        outcomes: list[str] = []
        c0, w0 = time.process_time(), time.perf_counter()
        for batch_id in batch_ids:
            outcomes.append(await self.svc.poller.poll_once(batch_id))
        return time.process_time() - c0, time.perf_counter() - w0, outcomes

    async def ceiling(self, batch_ids: list[str]) -> float:
        """CPU seconds of orjson.loads over the pages of those batches."""
        headers = {"Authorization": f"Bearer {API_KEY}"}
        bodies: list[bytes] = []
        for batch_id in batch_ids:
            url = self.sim_url + UPSTREAM_CALLS_PATH.format(batch_id=batch_id)
            page = 1
            while True:
                params = {"page": str(page), "limit": str(PAGE_SIZE)}
                async with self.http.get(url, params=params, headers=headers) as resp:
                    resp.raise_for_status()
                    body = await resp.read()
                bodies.append(body)
                if not orjson.loads(body)["data"]["has_more"]:
                    break
                page += 1
        gc.collect()
        loads = orjson.loads
        t0 = time.process_time()
        for body in bodies:
            loads(body)
        return time.process_time() - t0

    async def mutate(self, batch_ids: list[str]) -> int:
        self.round += 1
        params = [("ratio", str(CHANGE_RATIO)), ("round", str(self.round)), ("mode", "spread")]
        params += [("batch", b) for b in batch_ids]
        async with self.http.post(self.sim_url + "/_bench/mutate", params=params) as resp:
            resp.raise_for_status()
            return int((await resp.json())["changed"])


def fit(points: list[tuple[int, int, float]]) -> dict[str, float]:
    """Least squares of cpu = a * batches + b * calls over (batches, calls, cpu_s)."""
    sxx = sum(b * b for b, _, _ in points)
    syy = sum(c * c for _, c, _ in points)
    sxy = sum(b * c for b, c, _ in points)
    sxz = sum(b * z for b, _, z in points)
    syz = sum(c * z for _, c, z in points)
    det = sxx * syy - sxy * sxy
    if not det:
        return {"per_batch_ms": float("nan"), "per_1k_calls_ms": float("nan")}
    a = (sxz * syy - syz * sxy) / det
    b = (sxx * syz - sxy * sxz) / det
    return {"per_batch_ms": 1000 * a, "per_1k_calls_ms": 1e6 * b}


async def run(quick: bool = False, profile: bool = True) -> dict[str, Any]:
    layout = QUICK_LAYOUT if quick else FULL_LAYOUT
    reps = 1 if quick else 3
    started = time.perf_counter()
    groups_out: dict[str, Any] = {}
    with (
        valkey_server() as valkey,
        child_server("bench.sim_server", ["--layout", layout], "sim_server_scale") as sim,
    ):
        bench = Bench(sim.url, valkey.url)
        try:
            async with bench.http.get(sim.url + "/_bench/info") as resp:
                info = await resp.json()
            await bench.start()
            groups: dict[str, list[str]] = info["groups"]
            for name, batch_ids in groups.items():
                calls = sum(info["sizes"][b] for b in batch_ids)
                cold_cpu, cold_wall, _ = await bench.cycle(batch_ids)
                samples: dict[str, dict[str, list[float]]] = {
                    case: {"cpu_s": [], "wall_s": [], "loads_s": [], "ratio": []} for case in CASES
                }
                changed: list[int] = []
                # Small groups repeat the cycle so each sample covers >= 10,000 calls
                # (a 1,000-call cycle is a few ms of CPU, too close to the noise).
                inner = max(1, MIN_CALLS_PER_SAMPLE // calls)
                for _ in range(reps):
                    for case in CASES:
                        cpu = wall = 0.0
                        for _ in range(inner):
                            if case == "10pct":
                                changed.append(await bench.mutate(batch_ids))
                            c, w, outcomes = await bench.cycle(batch_ids)
                            assert all(o in ("committed", "unchanged") for o in outcomes)
                            cpu, wall = cpu + c, wall + w
                        cpu, wall = cpu / inner, wall / inner
                        loads = await bench.ceiling(batch_ids)
                        s = samples[case]
                        s["cpu_s"].append(cpu)
                        s["wall_s"].append(wall)
                        s["loads_s"].append(loads)
                        s["ratio"].append(cpu / loads)
                groups_out[name] = {
                    "cycles_per_sample": inner,
                    "batches": len(batch_ids),
                    "calls_per_batch": calls // len(batch_ids),
                    "calls": calls,
                    "pages": sum(-(-info["sizes"][b] // PAGE_SIZE) for b in batch_ids),
                    "cold_cpu_s": cold_cpu,
                    "cold_wall_s": cold_wall,
                    "changed_per_cycle": median([float(c) for c in changed]),
                    "cases": {
                        case: {
                            "cpu_s": median(s["cpu_s"]),
                            "wall_s": median(s["wall_s"]),
                            "loads_s": median(s["loads_s"]),
                            "cpu_ms_per_1k_calls": 1e6 * median(s["cpu_s"]) / calls,
                            "ratio_to_loads": median(s["ratio"]),
                            "samples": s,
                        }
                        for case, s in samples.items()
                    },
                }
        finally:
            await bench.close()
    linearity: dict[str, Any] = {}
    for case in CASES:
        per_1k = {g: v["cases"][case]["cpu_ms_per_1k_calls"] for g, v in groups_out.items()}
        ratios = {g: v["cases"][case]["ratio_to_loads"] for g, v in groups_out.items()}
        linearity[case] = {
            "cpu_ms_per_1k_calls": per_1k,
            "spread": max(per_1k.values()) / min(per_1k.values()),
            "ratio_to_loads_spread": max(ratios.values()) / min(ratios.values()),
            "fit": fit(
                [(v["batches"], v["calls"], v["cases"][case]["cpu_s"]) for v in groups_out.values()]
            ),
        }
    return {
        "layout": layout,
        "page_size": PAGE_SIZE,
        "reps": reps,
        "target_spread": TARGET_SPREAD,
        "groups": groups_out,
        "linearity": linearity,
        "elapsed_s": time.perf_counter() - started,
    }
