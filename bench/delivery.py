"""Signed, durable deliveries per second against plain POSTs to the same receiver.

Setup: a real Valkey server and a receiver (``bench.receiver``), each in its own
process; the bench process runs the service's real `DeliveryQueue` and `Deliverer`
(wired by `Bridge.create`, one subscription with ``max_in_flight`` = C and
``delivery.global_max_in_flight`` = C).

For each concurrency C:

* ``plain``: the ceiling. C coroutines POST the same N bodies with one aiohttp
  session (same connector settings as the service), no Redis, no signing.
* ``loops``: production path. N deliveries are enqueued with `DeliveryQueue.enqueue`,
  then `Deliverer.run` (the loop `callbridge run` runs) delivers until all N are
  delivered or the time budget is over; rate = successful deliveries / elapsed.
* ``drain``: `Deliverer.drain` (claim up to C, deliver them all, repeat): the
  path the tests use, without the loop's idle waits.

Ratio = deliveries/s / plain POSTs/s. Memory per queued delivery is the Redis
``used_memory`` delta of enqueueing N deliveries, divided by N.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.common import (
    SECRET,
    Server,
    child_server,
    make_settings,
    median,
    redis_used_memory,
    valkey_server,
)
from bench.poll_cycle import top_functions
from callbridge.app import Bridge
from callbridge.config import Settings
from callbridge.deliver.deliverer import Deliverer
from callbridge.models import Event
from callbridge.store.keys import Keys

SUB = "crm"
TARGET_RATIO = 0.8
ENQUEUE_CHUNK = 500
SERVICE_MODES = ("loops", "drain")


def make_events(n: int) -> list[Event]:
    """N ``call.completed`` events shaped like the poller's, one per call."""
    events: list[Event] = []
    for i in range(n):
        call_id = f"call_{i:08x}"
        item = {
            "call_id": call_id,
            "external_id": str(101 + i),
            "phone_number": f"91{9000000000 + i}",
            "name": "Priya Sharma",
            "status": "completed",
            "duration_seconds": 42.5,
            "started_at": "2026-11-28T10:00:15Z",
            "ended_at": "2026-11-28T10:00:57Z",
            "metadata": {"Name": "Priya Sharma", "Company Name": "Acme Corporation"},
        }
        data = {
            "batch_id": "sched_bench",
            "call_id": call_id,
            "external_id": item["external_id"],
            "status": "completed",
            "previous_status": "in_progress",
            "sequence": 5,
            "initial": False,
            "skipped_statuses": [],
            "call": item,
        }
        events.append(
            Event.build(
                event_id=f"evt_{i:024x}",
                type="call.completed",
                timestamp="2026-11-28T10:00:57.123Z",
                batch_id="sched_bench",
                call_id=call_id,
                data=data,
            )
        )
    return events


class Bench:
    def __init__(
        self,
        valkey: Server,
        receiver: Server,
        events: list[Event],
        *,
        delivery: dict[str, Any] | None = None,
    ) -> None:
        self.valkey, self.receiver = valkey, receiver
        # Delivery settings other than the defaults (``http_client``, for experiments).
        self.delivery = delivery or {}
        self.redis_url = valkey.url
        self.hook_url = receiver.url + "/hook"
        self.events = events
        self.keys = Keys()
        # Any, as service/redisconn.py does: redis-py's command types are loose.
        self.redis: Any = aioredis.Redis.from_url(self.redis_url)

    def settings(self, concurrency: int) -> Settings:
        return make_settings(
            "http://127.0.0.1:9",
            self.redis_url,
            subscriptions=[
                {
                    "name": SUB,
                    "url": self.hook_url,
                    "secret": SECRET,
                    "events": ["*"],
                    "max_in_flight": concurrency,
                    "timeout_seconds": 10,
                }
            ],
            delivery={**self.delivery, "global_max_in_flight": concurrency},
        )

    async def receiver_stats(self, session: aiohttp.ClientSession) -> dict[str, int]:
        base = self.hook_url.rsplit("/", 1)[0]
        async with session.get(base + "/_stats") as resp:
            stats: dict[str, int] = await resp.json()
            return stats

    async def receiver_reset(self, session: aiohttp.ClientSession) -> None:
        base = self.hook_url.rsplit("/", 1)[0]
        async with session.post(base + "/_reset") as resp:
            resp.raise_for_status()

    async def plain(self, concurrency: int, budget_s: float, min_s: float) -> dict[str, Any]:
        """The ceiling: the same bodies, same receiver, same concurrency; nothing else.

        Passes over the N bodies are repeated until `min_s` has elapsed, so the
        ceiling is not measured over a fraction of a second.
        """
        single = [ev.body for ev in self.events]
        bodies = single * max(1, min(50, int(min_s * 20_000 / len(single)) + 1))
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
        )
        headers = {"Content-Type": "application/json"}
        next_index = 0
        done = 0
        deadline = 0.0
        enough = 0.0

        async def worker() -> None:
            nonlocal next_index, done
            while next_index < len(bodies) and time.perf_counter() < deadline:
                if next_index >= len(single) and time.perf_counter() > enough:
                    return
                body = bodies[next_index]
                next_index += 1
                async with session.post(self.hook_url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1

        try:
            await self.receiver_reset(session)
            gc.collect()
            others = self._others()
            c0, w0 = time.process_time(), time.perf_counter()
            deadline, enough = w0 + budget_s, w0 + min_s
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            stats = await self.receiver_stats(session)
        finally:
            await session.close()
        return self._rate("plain", done, cpu, wall, stats, others)

    def _others(self) -> tuple[float, float]:
        return self.valkey.cpu_s(), self.receiver.cpu_s()

    def _rate(
        self,
        mode: str,
        done: int,
        cpu: float,
        wall: float,
        stats: dict[str, int],
        others: tuple[float, float],
    ) -> dict[str, Any]:
        valkey = self.valkey.cpu_s() - others[0]
        receiver = self.receiver.cpu_s() - others[1]
        per = 1000 / done if done else float("nan")
        return {
            "mode": mode,
            "delivered": done,
            "wall_s": wall,
            "per_s": done / wall if wall > 0 else 0.0,
            "cpu_s": cpu,
            "cpu_utilisation": cpu / wall if wall > 0 else 0.0,
            "cpu_ms_per_delivery": cpu * per,
            # The other processes, from /proc (10 ms ticks).
            "valkey_cpu_ms_per_delivery": valkey * per,
            "receiver_cpu_ms_per_delivery": receiver * per,
            "receiver": stats,
        }

    async def _service(self, concurrency: int) -> Bridge:
        await self.redis.execute_command("FLUSHDB", "SYNC")
        return await Bridge.create(self.settings(concurrency), replica_id="bench")

    async def enqueue(self, svc: Bridge) -> dict[str, Any]:
        """Enqueue every event for the subscription; memory and time it took."""
        used0 = await redis_used_memory(self.redis)
        now_ms = int(time.time() * 1000)
        c0, w0 = time.process_time(), time.perf_counter()
        added = 0
        for i in range(0, len(self.events), ENQUEUE_CHUNK):
            chunk = self.events[i : i + ENQUEUE_CHUNK]
            created, _ = await svc.queue.enqueue(SUB, [(ev, now_ms) for ev in chunk])
            added += created
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        used1 = await redis_used_memory(self.redis)
        record = await self.redis.execute_command(
            "MEMORY", "USAGE", self.keys.delivery(SUB, self.events[0].id), "SAMPLES", "0"
        )
        assert added == len(self.events), (added, len(self.events))
        return {
            "n": added,
            "per_s": added / wall,
            "cpu_ms_per_delivery": 1000 * cpu / added,
            "used_memory_delta_bytes": used1 - used0,
            "bytes_per_delivery": (used1 - used0) / added,
            "record_memory_usage_bytes": int(record or 0),
            "body_bytes": len(self.events[0].body),
        }

    @staticmethod
    def _delivered(svc: Bridge) -> int:
        # The counter's own value: cheap enough to poll every few ms (a registry
        # collect() would cost the bench process noticeable CPU).
        child: Any = svc.metrics.delivery_attempts.labels(SUB, "success", "2xx")
        return int(child._value.get())

    async def service_run(
        self,
        mode: str,
        concurrency: int,
        budget_s: float,
        *,
        profile: bool = False,
    ) -> dict[str, Any]:
        """Enqueue N, then deliver them with the service's code path named by `mode`."""
        svc = await self._service(concurrency)
        try:
            memory = await self.enqueue(svc)
            deliverer = svc.deliverer
            await self.receiver_reset(svc.session)
            prof = cProfile.Profile(time.process_time) if profile else None
            gc.collect()
            if prof is not None:
                prof.enable()
            others = self._others()
            c0, w0 = time.process_time(), time.perf_counter()
            if mode == "drain":
                await self._drain(deliverer, w0 + budget_s)
            else:
                await self._loops(deliverer, svc, w0 + budget_s)
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            if prof is not None:
                prof.disable()
            stats = await self.receiver_stats(svc.session)
            out = self._rate(mode, self._delivered(svc), cpu, wall, stats, others)
            out["enqueue"] = memory
            if prof is not None:
                out["profile"] = top_functions(prof, f"delivery_{mode}_c{concurrency}")
            return out
        finally:
            await svc.close()

    async def _drain(self, deliverer: Deliverer, deadline: float) -> None:
        while time.perf_counter() < deadline:
            if await deliverer.run_once(SUB) == 0:
                return

    async def _loops(self, deliverer: Deliverer, svc: Bridge, deadline: float) -> None:
        stopping = asyncio.Event()
        task = asyncio.create_task(deliverer.run(stopping))
        try:
            n = len(self.events)
            # The service has no "all delivered" hook: poll its own success counter.
            while time.perf_counter() < deadline and self._delivered(svc) < n:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        finally:
            stopping.set()
            await task


async def _timed(fn: Callable[[], Awaitable[dict[str, Any]]], reps: int) -> dict[str, Any]:
    """Median-rate run of `reps` repetitions (all kept in `samples`)."""
    runs = [await fn() for _ in range(reps)]
    best = sorted(runs, key=lambda r: r["per_s"])[len(runs) // 2]
    return {**best, "samples_per_s": [r["per_s"] for r in runs]}


async def run(quick: bool = False, profile: bool = True) -> dict[str, Any]:
    n = 2_000 if quick else 5_000
    budget = 4.0 if quick else 12.0
    reps = 1 if quick else 3
    min_plain = 0.5 if quick else 1.5
    concurrencies = [16, 64]
    started = time.perf_counter()
    events = make_events(n)
    results: dict[str, Any] = {"n": n, "budget_s": budget, "target_ratio": TARGET_RATIO}
    per_c: dict[str, Any] = {}
    with (
        valkey_server() as valkey,
        child_server("bench.receiver", ["--verify-every", "50"], "receiver") as receiver,
    ):
        bench = Bench(valkey, receiver, events)
        try:
            for c in concurrencies:
                row: dict[str, Any] = {}
                row["plain"] = await _timed(lambda c=c: bench.plain(c, budget, min_plain), reps)  # type: ignore[misc]
                for mode in SERVICE_MODES:
                    row[mode] = await _timed(
                        lambda m=mode, c=c: bench.service_run(m, c, budget),  # type: ignore[misc]
                        reps,
                    )
                    row[mode]["ratio"] = row[mode]["per_s"] / row["plain"]["per_s"]
                    samples = row[mode]["samples_per_s"]
                    row[mode]["ratio_samples"] = [s / row["plain"]["per_s"] for s in samples]
                per_c[str(c)] = row
            if profile and not quick:
                prof_c = max(concurrencies)
                profiled = await bench.service_run("loops", prof_c, budget, profile=True)
                results["profile_loops"] = {"concurrency": prof_c, **profiled["profile"]}
        finally:
            await bench.redis.aclose()
    results["concurrency"] = per_c
    mem = per_c[str(concurrencies[0])]["loops"]["enqueue"]
    results["memory_per_queued_delivery_bytes"] = mem["bytes_per_delivery"]
    results["median_ratio"] = {
        mode: median([per_c[str(c)][mode]["ratio"] for c in concurrencies])
        for mode in SERVICE_MODES
    }
    results["elapsed_s"] = time.perf_counter() - started
    return results
