"""Growth stops at the policy's limits (issue 12): minutes of traffic through a real
`callbridge run` with a subscription disabled in config, one whose endpoint answers
410 (disabled, its backlog capped), one removed from the config (deleted after its
retention), finished batches retired and watched again, and a long batch removed
with DELETE while running and added back before its state would have expired.
Redis memory, its key count and the number of metric series level off; no event is
lost (every call's sequences 1..n and final status, every batch.completed, delivered)
or re-emitted (one id per call and sequence, one body per id).

Long: `pytest -m slow tests/soak/test_growth.py -s` (CALLBRIDGE_GROWTH_SECONDS, 180).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from callbridge.models import Event
from callbridge.simulator import Simulator, SimulatorConfig, make_app
from callbridge.store.keys import Keys
from callbridge.store.queue import DeliveryQueue
from callbridge.store.registry import BatchRegistry
from tests.support.bridge import start_bridge, stop_bridge, write_config
from tests.support.prometheus import wait_for
from tests.support.servers import free_port
from tests.support.settings import API_KEY

TOKEN = "growth-admin-token-0123456789"
RETENTION_S = 10  # retired_retention_seconds: state of retired and removed batches
ORPHAN_S = 30  # orphan_retention_seconds: keys of a subscription the config lost
LONG = "sched_long"  # 2,000 calls: still running long after its removal


class Recorder:
    """What the CRM received, small: a digest per body, ids per call and sequence."""

    def __init__(self, status: int = 204) -> None:
        self.status = status
        self.bodies: dict[str, set[bytes]] = {}
        self.repeats = 0  # the same id again (at-least-once), same body
        self.ids: dict[tuple[str, str, int], set[str]] = {}
        # Per call, the status of its highest sequence (deliveries may cross).
        self.finals: dict[tuple[str, str], tuple[int, str]] = {}
        self.completed: dict[str, set[str]] = {}

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if self.status == 204:
                self._record(request.headers["webhook-id"], body)
            return web.Response(status=self.status)

        app = web.Application()
        app.router.add_post("/hook", handle)
        return app

    def _record(self, event_id: str, body: bytes) -> None:
        seen = self.bodies.setdefault(event_id, set())
        self.repeats += bool(seen)
        seen.add(hashlib.blake2b(body, digest_size=8).digest())
        doc = orjson.loads(body)
        data = doc["data"]
        if doc["type"] == "batch.completed":
            self.completed.setdefault(data["batch_id"], set()).add(event_id)
            return
        call = (data["batch_id"], data["call_id"])
        self.ids.setdefault((*call, data["sequence"]), set()).add(event_id)
        if doc["type"] != "call.updated":
            latest = (data["sequence"], data["status"])
            self.finals[call] = max(self.finals.get(call, latest), latest)

    def problems(self, sim: Simulator) -> list[str]:
        """What was lost or emitted twice; empty when the run is clean."""
        return self.reemitted() + self.missing(sim)

    def reemitted(self) -> list[str]:
        """Events emitted twice: waiting longer cannot make these right."""
        out = [f"id {i} with {len(b)} bodies" for i, b in self.bodies.items() if len(b) > 1]
        return out + [f"{k}: {len(v)} ids" for k, v in self.ids.items() if len(v) > 1]

    def missing(self, sim: Simulator) -> list[str]:
        """Events not delivered (yet)."""
        out: list[str] = []
        seqs: dict[tuple[str, str], set[int]] = {}
        for batch, call, seq in self.ids:
            seqs.setdefault((batch, call), set()).add(seq)
        gaps = {c: s for c, s in seqs.items() if s != set(range(1, 1 + max(s)))}
        out += [f"{c}: sequences {sorted(s)}" for c, s in gaps.items()]
        for batch_id in sim.batch_ids:
            if not self.completed.get(batch_id):
                out.append(f"{batch_id}: no batch.completed")
            for call in sim.calls(batch_id):
                got = self.finals.get((batch_id, call["call_id"]), (0, ""))[1]
                if got != call["status"]:
                    out.append(f"{batch_id}/{call['call_id']}: {got!r} != {call['status']!r}")
        return out


@dataclass
class Run:
    """The run's moves and its samples (elapsed s, used_memory, keys, series, registry)."""

    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    rewatched: set[str] = field(default_factory=set)
    added: int = 0
    removed_at: float | None = None
    readded_at: float | None = None
    long_running_past_expiry: bool | None = None
    long_ttl_past_expiry: int | None = None
    old_deleted_at: float | None = None


async def series(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_growth_levels_off_at_the_policy_limits(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis, aiohttp_server: Any
) -> None:
    seconds = float(os.environ.get("CALLBRIDGE_GROWTH_SECONDS", "180"))
    sim = Simulator(
        SimulatorConfig(api_key=API_KEY, seed=7, batches=8, calls_per_batch=200, concurrency=100)
    )
    upstream = await aiohttp_server(make_app(sim))
    crm, gone = Recorder(), Recorder(status=410)
    crm_hook = await aiohttp_server(crm.app())
    gone_hook = await aiohttp_server(gone.app())
    keys = Keys()
    # A subscription the config no longer names, with what it left behind; last
    # named now, so the run sees it kept for its retention, then deleted.
    leftovers = [
        Event.build(
            event_id=f"evt_old_{i}",
            type="call.completed",
            timestamp="2026-11-30T00:00:00.000Z",
            batch_id="sched_old",
            call_id=f"c{i}",
            data={},
        )
        for i in range(2000)
    ]
    await DeliveryQueue(redis_client, keys).enqueue("old", [(e, 0) for e in leftovers])
    await redis_client.hset(keys.subscriptions(), "old", int(time.time() * 1000))
    port = free_port()
    path = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(crm_hook.make_url("/hook")),
        sim.batch_ids,
        upstream={"page_size": 100, "max_requests_per_second": 200},
        poller={
            "interval_seconds": 0.5,
            "quiet_period_seconds": 2,
            "linger_interval_seconds": 1,
            "linger_seconds": 2,
            "retired_retention_seconds": RETENTION_S,
        },
        delivery={
            "retention_seconds": 10,
            "dead_letter_retention_seconds": 10,
            "orphan_retention_seconds": ORPHAN_S,
        },
        server={"port": port},
        admin={"token": TOKEN},
    )
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    path.write_text(
        path.read_text().replace(
            "subscriptions:\n",
            "subscriptions:\n"
            f"- {{name: gone, url: '{gone_hook.make_url('/hook')}', secret: {secret}, "
            "retry_schedule_seconds: [0.2], max_backlog: 300}\n"
            f"- {{name: paused, url: '{crm_hook.make_url('/hook')}', enabled: false, "
            f"secret: {secret}}}\n",
        )
    )
    bridge = await start_bridge(path, log=tmp_path / "bridge.log")
    run = Run()
    clock = asyncio.create_task(_clock(sim))
    try:
        async with aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            await wait_for(lambda: _ready(api), timeout_s=30, what="the bridge to start")
            sim.add_batch(LONG, 2000)
            await _watch(api, LONG)
            await _play(run, sim, api, redis_client, keys, port, seconds, bridge, tmp_path)
            # Settle: no new batches; the last ones finish and every delivery is made.
            deadline = time.monotonic() + 300
            while crm.problems(sim):
                assert not crm.reemitted(), crm.reemitted()[:10]
                assert time.monotonic() < deadline, crm.problems(sim)[:10]
                await asyncio.sleep(1)
    finally:
        clock.cancel()
        await stop_bridge(bridge)
    _report(run, crm, await redis_client.zcard(keys.due("gone")))
    samples = run.samples
    third = max(1, len(samples) // 3)
    middle, last = samples[third : 2 * third], samples[2 * third :]
    for i, slack in ((1, 2 * 2**20), (2, 500), (3, 20), (4, 5)):
        mid, end = max(s[i] for s in middle), max(s[i] for s in last)
        assert end <= mid * 1.25 + slack, (i, mid, end)
    # The removed subscription: kept for its retention, then every key gone.
    assert run.old_deleted_at is not None
    assert run.old_deleted_at >= ORPHAN_S - 5
    assert set(await redis_client.hkeys(keys.subscriptions())) == {b"crm", b"gone", b"paused"}
    # Disabled by 410: capped; disabled in config: collects nothing.
    assert await redis_client.zcard(keys.due("gone")) <= 300
    assert await redis_client.zcard(keys.due("paused")) == 0
    # The long batch was running when its old expiry came: its state stayed.
    assert run.long_running_past_expiry, "the long batch ended too soon to tell"
    assert run.long_ttl_past_expiry == -1
    assert crm.problems(sim) == []
    assert crm.repeats == 0


async def _play(
    run: Run,
    sim: Simulator,
    api: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    keys: Keys,
    port: int,
    seconds: float,
    bridge: asyncio.subprocess.Process,
    tmp_path: Path,
) -> None:
    registry = BatchRegistry(redis_client, keys)
    started = time.monotonic()
    next_sample = 0.0
    async with aiohttp.ClientSession() as plain:
        while (now := time.monotonic() - started) < seconds:
            await asyncio.sleep(1)
            assert bridge.returncode is None, (tmp_path / "bridge.log").read_text()[-2000:]
            await _remove_and_add_back(run, sim, api, redis_client, keys, now)
            if run.old_deleted_at is None and not [
                k async for k in redis_client.scan_iter(match=keys.subscription_pattern("old"))
            ]:
                run.old_deleted_at = now
            if now < next_sample:
                continue
            next_sample = now + 5
            for batch_id in list(sim.batch_ids):
                reg = await registry.get(batch_id)
                if reg is not None and reg.retired and batch_id not in run.rewatched:
                    # Retired with its state still kept: watched again, then let go.
                    run.rewatched.add(batch_id)
                    await _watch(api, batch_id)
                    new_id = f"sched_grow{run.added:04d}"
                    run.added += 1
                    sim.add_batch(new_id, 200)
                    await _watch(api, new_id)
            used = int((await redis_client.info("memory"))["used_memory"])
            n_keys = int(await redis_client.dbsize())
            n_registered = int(await redis_client.hlen(keys.batches()))
            try:
                n_series = await series(plain, port)
            except aiohttp.ClientError:
                continue
            run.samples.append((now, used, n_keys, n_series, n_registered))


async def _remove_and_add_back(
    run: Run,
    sim: Simulator,
    api: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    keys: Keys,
    now: float,
) -> None:
    """DELETE the long batch while it runs, add it back 3 s later; look at it once its
    state would have expired under it (it once did, and every call was re-emitted)."""
    removed = run.removed_at
    if removed is None:
        if now >= 15:
            async with api.delete(f"/v1/batches/{LONG}") as resp:
                assert resp.status == 200, await resp.text()
            run.removed_at = now
    elif run.readded_at is None:
        if now >= removed + 3:
            await _watch(api, LONG)
            run.readded_at = now
    elif run.long_running_past_expiry is None and now >= removed + RETENTION_S + 5:
        run.long_running_past_expiry = not sim.is_finished(LONG)
        run.long_ttl_past_expiry = int(await redis_client.pttl(keys.snapshot(LONG)))


async def _watch(api: aiohttp.ClientSession, batch_id: str) -> None:
    async with api.post("/v1/batches", json={"id": batch_id}) as resp:
        assert resp.status in (200, 201), await resp.text()


async def _ready(api: aiohttp.ClientSession) -> bool:
    """Whether the bridge answers /healthz with 200 (its loops run)."""
    try:
        async with api.get("/healthz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def _report(run: Run, crm: Recorder, depth_gone: int) -> None:
    print(
        f"\ngrowth: {len(run.samples)} samples over {run.samples[-1][0]:.0f}s, "
        f"{run.added} batches added, {len(run.rewatched)} re-watched; {LONG} removed at "
        f"{run.removed_at}s, added back at {run.readded_at}s, running past its old expiry: "
        f"{run.long_running_past_expiry} (pttl {run.long_ttl_past_expiry}); 'old' deleted at "
        f"{run.old_deleted_at}s; 'gone' queued {depth_gone} (max_backlog 300); "
        f"{len(crm.bodies)} ids delivered, {crm.repeats} repeats"
    )
    third = max(1, len(run.samples) // 3)
    for name, part in (
        ("middle", run.samples[third : 2 * third]),
        ("last", run.samples[2 * third :]),
    ):
        peak = [max(s[i] for s in part) for i in range(1, 5)]
        print(
            f"  {name} third, peaks: used_memory {peak[0] / 2**20:.2f} MB, keys {peak[1]}, "
            f"series {peak[2]}, registered {peak[3]}"
        )
    print("   t(s)  used_memory(MB)  keys  series  registered")
    for t, used, n_keys, n_series, n_registered in run.samples[:: max(1, len(run.samples) // 12)]:
        print(f"  {t:5.0f}  {used / 2**20:15.2f}  {n_keys:4d}  {n_series:6d}  {n_registered:10d}")


async def _clock(sim: Simulator) -> None:
    while True:
        await asyncio.sleep(0.25)
        sim.advance()
