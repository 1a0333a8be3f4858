"""CPU of one poll cycle (`Poller.poll_once`) over a 100,000-call batch, against a ceiling.

Setup: a real Valkey server and the simulator (``bench.sim_server``), each in its own
process, so only the bridge's own work is on this process's CPU clock. The
Bridge is wired by `Bridge.create` exactly as in production, with one
subscription (events are fanned out into its queue; nobody delivers them here).

Cases, each repeated and reported as the median:

* ``cold``: first cycle of a replica with an empty Redis: every page decoded, every
  call diffed and written (all calls are ``pending``, so they are recorded silently);
* ``warm_nochange``: the next cycles with nothing changed upstream;
* ``warm_10pct``: 10% of the calls changed between cycles, spread over every page
  (half a status step, half a field change): 10,000 events a cycle;
* ``warm_10pct_clustered``: the same 10% as one contiguous run of calls (20 pages).

Ceiling: ``orjson.loads`` of the cycle's 200 page bodies (fetched once with aiohttp
after the cycle, same process, same clock). Ratio = cycle CPU / loads CPU, computed
per repetition from adjacent measurements; the median is reported. The CPU of that
plain aiohttp fetch is reported beside it as the HTTP floor any poller pays.
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.common import (
    API_KEY,
    REPO,
    RESULTS,
    SECRET,
    Server,
    child_server,
    make_settings,
    median,
    redis_used_memory,
    valkey_server,
)
from bench.phases import PhaseTimer
from callbridge.app import Bridge
from callbridge.cli.main import tune_gc
from callbridge.config import Settings
from callbridge.constants import UPSTREAM_CALLS_PATH
from callbridge.store.keys import Keys

CALLS = 100_000
PAGE_SIZE = 500
CHANGE_RATIO = 0.1
TARGETS: dict[str, float] = {
    "warm_nochange": 1.5,
    "warm_10pct": 2.0,
    "snapshot_bytes_per_call": 200.0,
}


@dataclass
class CaseResult:
    name: str
    description: str
    cycle_cpu_s: list[float] = field(default_factory=list)
    cycle_wall_s: list[float] = field(default_factory=list)
    ceiling_cpu_s: list[float] = field(default_factory=list)
    fetch_cpu_s: list[float] = field(default_factory=list)
    valkey_cpu_s: list[float] = field(default_factory=list)
    sim_cpu_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    phases: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        loads, fetch = median(self.ceiling_cpu_s), median(self.fetch_cpu_s)
        return {
            "description": self.description,
            "reps": len(self.ratios),
            "cycle_cpu_s": median(self.cycle_cpu_s),
            "cycle_wall_s": median(self.cycle_wall_s),
            "ceiling_cpu_s": loads,
            "ratio": median(self.ratios),
            "ratio_min": min(self.ratios),
            "ratio_max": max(self.ratios),
            "target_ratio": TARGETS.get(self.name),
            "http_fetch_cpu_s": fetch,
            "ratio_vs_fetch_plus_loads": median(self.cycle_cpu_s) / (fetch + loads),
            # Other processes' CPU during the cycle (from /proc, 10 ms ticks).
            "valkey_cpu_s": median(self.valkey_cpu_s),
            "simulator_cpu_s": median(self.sim_cpu_s),
            "outcomes": sorted(set(self.outcomes)),
            "events_per_cycle": median([float(e) for e in self.events]),
            "phases": self.phases,
            "profile": self.profile,
            "samples": {
                "cycle_cpu_s": self.cycle_cpu_s,
                "ceiling_cpu_s": self.ceiling_cpu_s,
                "fetch_cpu_s": self.fetch_cpu_s,
                "ratios": self.ratios,
            },
        }


def top_functions(prof: cProfile.Profile, label: str, n: int = 15) -> dict[str, Any]:
    """Saves the full listing to results/ and returns the top `n` by own CPU time."""
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(50)
    path = RESULTS / f"profile_{label}.txt"
    path.write_text(text.getvalue())
    raw: Any = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return {
        "file": str(path.relative_to(REPO)),
        "total_cpu_s_under_profiler": total,
        "top_tottime": [
            {
                "function": f"{fn[0].rsplit('/', 2)[-1]}:{fn[1]}({fn[2]})",
                "calls": v[1],
                "tottime_s": v[2],
                "cumtime_s": v[3],
                "share": v[2] / total if total else 0.0,
            }
            for fn, v in top
        ],
    }


class Bench:
    def __init__(self, sim: Server, valkey: Server, batch_id: str) -> None:
        self.sim, self.valkey = sim, valkey
        sim_url, redis_url = sim.url, valkey.url
        self.sim_url = sim_url
        self.batch_id = batch_id
        self.keys = Keys()
        self.settings: Settings = make_settings(
            sim_url,
            redis_url,
            subscriptions=[
                {
                    "name": "crm",
                    # Never contacted: the Deliverer is not run by this benchmark.
                    "url": "http://127.0.0.1:9/hook",
                    "secret": SECRET,
                    "events": ["*"],
                }
            ],
            # Every page every cycle: this benchmark measures the diff and commit path
            # per changed call. Under `auto` the planner would read only the active
            # lists after the first changes and miss the field edits of pending and
            # finished calls by design (bench/planner.py measures the planner).
            poller={"scan": "full"},
        )
        # Any, as service/redisconn.py does: redis-py's command types are loose.
        self.redis: Any = aioredis.Redis.from_url(redis_url)
        self.http = aiohttp.ClientSession()
        self.svc: Bridge | None = None
        self.round = 0

    async def close(self) -> None:
        if self.svc is not None:
            await self.svc.close()
        await self.http.close()
        await self.redis.aclose()

    async def fresh_service(self) -> Bridge:
        """An empty Redis and a new replica: the next cycle is a cold one."""
        if self.svc is not None:
            await self.svc.close()
            self.svc = None
        # SYNC: a lazy flush would still hold the old data when used_memory is read.
        await self.redis.execute_command("FLUSHDB", "SYNC")
        self.svc = await Bridge.create(self.settings, replica_id="bench")
        return self.svc

    async def fetch_bodies(self) -> list[bytes]:
        url = self.sim_url + UPSTREAM_CALLS_PATH.format(batch_id=self.batch_id)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        bodies: list[bytes] = []
        page = 1
        while True:
            params = {"page": str(page), "limit": str(PAGE_SIZE)}
            async with self.http.get(url, params=params, headers=headers) as resp:
                resp.raise_for_status()
                bodies.append(await resp.read())
            if len(bodies) >= CALLS // PAGE_SIZE:
                return bodies
            page += 1

    async def ceiling(self) -> tuple[float, float]:
        """CPU seconds of (orjson.loads over the 200 page bodies, fetching them)."""
        gc.collect()
        t0 = time.process_time()
        bodies = await self.fetch_bodies()
        fetch = time.process_time() - t0
        assert not orjson.loads(bodies[-1])["data"]["has_more"]
        gc.collect()
        loads = orjson.loads
        t0 = time.process_time()
        for body in bodies:
            loads(body)
        return time.process_time() - t0, fetch

    async def mutate(self, mode: str) -> dict[str, int]:
        self.round += 1
        params = {"ratio": str(CHANGE_RATIO), "round": str(self.round), "mode": mode}
        async with self.http.post(self.sim_url + "/_bench/mutate", params=params) as resp:
            resp.raise_for_status()
            result: dict[str, int] = await resp.json()
            return result

    async def queued(self) -> int:
        return int(await self.redis.zcard(self.keys.due("crm")))

    async def cycle(self, case: CaseResult) -> None:
        """One measured cycle and its adjacent ceiling."""
        assert self.svc is not None
        before = await self.queued()
        gc.collect()
        v0, s0 = self.valkey.cpu_s(), self.sim.cpu_s()
        c0, w0 = time.process_time(), time.perf_counter()
        outcome = await self.svc.poller.poll_once(self.batch_id)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        case.valkey_cpu_s.append(self.valkey.cpu_s() - v0)
        case.sim_cpu_s.append(self.sim.cpu_s() - s0)
        loads, fetch = await self.ceiling()
        case.cycle_cpu_s.append(cpu)
        case.cycle_wall_s.append(wall)
        case.ceiling_cpu_s.append(loads)
        case.fetch_cpu_s.append(fetch)
        case.ratios.append(cpu / loads)
        case.outcomes.append(outcome)
        case.events.append(await self.queued() - before)

    async def phase_cycle(self, case: CaseResult) -> None:
        """One extra, unmeasured cycle with per-phase CPU accounting."""
        assert self.svc is not None
        timer = PhaseTimer()
        gc.collect()
        with timer.poll_phases():
            c0 = time.process_time()
            await self.svc.poller.poll_once(self.batch_id)
            total = time.process_time() - c0
        case.phases = timer.report(total)

    async def profiled_cycle(self, case: CaseResult) -> None:
        """One extra, unmeasured cycle under cProfile (CPU clock)."""
        assert self.svc is not None
        prof = cProfile.Profile(time.process_time)
        gc.collect()
        prof.enable()
        outcome = await self.svc.poller.poll_once(self.batch_id)
        prof.disable()
        case.profile = {"outcome": outcome, **top_functions(prof, f"poll_{case.name}")}

    async def memory(self, used_before: int | None) -> dict[str, float]:
        async def usage(key: str) -> int:
            return int(
                await self.redis.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0") or 0
            )

        snap = await usage(self.keys.snapshot(self.batch_id))
        tl = await usage(self.keys.timeline(self.batch_id))
        tracked = max(1, int(await self.redis.hlen(self.keys.snapshot(self.batch_id))))
        out: dict[str, float] = {
            "tracked_calls": tracked,
            "snapshot_bytes": snap,
            "snapshot_bytes_per_call": snap / tracked,
            "timeline_bytes": tl,
            "timeline_bytes_per_call": tl / tracked,
        }
        if used_before is not None:
            used = await redis_used_memory(self.redis)
            out["used_memory_delta_bytes"] = used - used_before
            out["used_memory_delta_per_call"] = (used - used_before) / tracked
        return out


async def run(quick: bool = False, profile: bool = True) -> dict[str, Any]:
    # As `callbridge run` does at start (production's garbage collector settings).
    tune_gc()
    reps = (
        {"cold": 1, "warm": 2, "clustered": 1} if quick else {"cold": 3, "warm": 5, "clustered": 3}
    )
    detail = profile and not quick
    started = time.perf_counter()
    cases = {
        "cold": CaseResult("cold", "first cycle, empty Redis, 100k new calls"),
        "warm_nochange": CaseResult("warm_nochange", "warm cycle, nothing changed"),
        "warm_10pct": CaseResult(
            "warm_10pct", "warm cycle, 10% of calls changed, spread over all pages"
        ),
        "warm_10pct_clustered": CaseResult(
            "warm_10pct_clustered", "warm cycle, 10% changed, contiguous (20 pages)"
        ),
        "whatif_gc_off_10pct": CaseResult(
            "whatif_gc_off_10pct", "what-if: warm_10pct with gc.disable() (not production)"
        ),
    }
    memory: dict[str, Any] = {"target_snapshot_bytes_per_call": TARGETS["snapshot_bytes_per_call"]}
    with (
        valkey_server() as valkey,
        child_server("bench.sim_server", ["--calls", str(CALLS)], "sim_server") as sim,
    ):
        async with aiohttp.ClientSession() as s, s.get(sim.url + "/_bench/info") as resp:
            info = await resp.json()
        bench = Bench(sim, valkey, info["batch_id"])
        try:
            # Cold: a new replica and an empty Redis each time; every call is pending.
            if detail:
                await bench.fresh_service()
                await bench.phase_cycle(cases["cold"])
            for _ in range(reps["cold"]):
                await bench.fresh_service()
                used0 = await redis_used_memory(bench.redis)
                await bench.cycle(cases["cold"])
                memory["after_cold"] = await bench.memory(used0)

            case = cases["warm_nochange"]
            for _ in range(reps["warm"]):
                await bench.cycle(case)
            if detail:
                await bench.phase_cycle(case)
                await bench.profiled_cycle(case)

            case = cases["warm_10pct"]
            for _ in range(reps["warm"]):
                await bench.mutate("spread")
                await bench.cycle(case)
            if detail:
                await bench.mutate("spread")
                await bench.phase_cycle(case)
                await bench.mutate("spread")
                await bench.profiled_cycle(case)

            case = cases["warm_10pct_clustered"]
            for _ in range(reps["clustered"]):
                await bench.mutate("clustered")
                await bench.cycle(case)
            if detail:
                await bench.mutate("clustered")
                await bench.phase_cycle(case)

            # The timeline grew by one entry per change since the cold cycle.
            memory["after_warm_cycles"] = await bench.memory(None)

            if detail:
                # What-if, not production code: the same 10% cycle with the cyclic
                # garbage collector off, the upper bound of any GC tuning.
                case = cases["whatif_gc_off_10pct"]
                gc.disable()
                try:
                    for _ in range(reps["clustered"]):
                        await bench.mutate("spread")
                        await bench.cycle(case)
                finally:
                    gc.enable()
        finally:
            await bench.close()
    return {
        "calls": CALLS,
        "pages": CALLS // PAGE_SIZE,
        "page_size": PAGE_SIZE,
        "subscriptions": 1,
        "cases": {name: case.summary() for name, case in cases.items() if case.ratios},
        "memory": memory,
        "elapsed_s": time.perf_counter() - started,
    }
