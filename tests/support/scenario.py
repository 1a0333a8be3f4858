"""Turbulence scenarios: the real bridge between a stuttering platform and a flaky CRM.

`run_scenario` wires the simulator in its wall-clock mode (served over loopback,
advanced by `run_clock`), a `FlakyReceiver`, and N `callbridge run` subprocesses
(`Replica`), kills replicas with SIGKILL on a seeded schedule, watches every
replica's ``/metrics``, waits for the world to finish and the deliveries to settle,
then judges the receiver's records with `tests.support.turbulence.check`.

Everything runs on one clock (`time.monotonic`): the simulator's ground truth, the
receiver's arrival times and the metrics watch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from callbridge.simulator import (
    FaultConfig,
    Simulator,
    SimulatorConfig,
    Timing,
    make_app,
    run_clock,
)
from tests.support.event_schemas import SchemaCheck, check_bodies
from tests.support.flaky import FlakyReceiver
from tests.support.replicas import Replica
from tests.support.settings import API_KEY, SECRET
from tests.support.turbulence import Report, check
from tests.support.watch import FleetWatch

ServerFactory = Callable[..., Awaitable[TestServer]]
# The admin API is on only to attribute missing statuses (call timelines).
ADMIN_TOKEN = "turbulence-admin-token-0123"

# 15 % of requests disturbed, plus a 2 s outage every 15 s: what issue 11 measured with.
PLATFORM_FAULTS = FaultConfig(
    server_error_ratio=0.05,
    rate_limit_ratio=0.03,
    malformed_ratio=0.02,
    slow_ratio=0.02,
    shift_ratio=0.01,
    reorder_ratio=0.02,
    reorder_share=0.1,
    outage_every_seconds=15,
    outage_seconds=2,
)


@dataclass(frozen=True)
class Scenario:
    """One turbulence run. Bridge settings not named here keep their defaults."""

    name: str
    batches: int = 2
    calls_per_batch: int = 600
    seed: int = 11
    concurrency: int = 300
    redial_probability: float = 0.5
    timing: Timing = field(default_factory=lambda: Timing(step_seconds=0.1))
    faults: FaultConfig = PLATFORM_FAULTS
    receiver_fail_share: float = 0.2
    hang_seconds: float = 3.0
    replicas: int = 1
    kills: int = 0
    kill_window_s: tuple[float, float] = (5.0, 40.0)
    poll_interval_s: float | None = 1.0  # None: the default (5 s)
    subscription: dict[str, Any] = field(
        # Hangs must outlast the timeout; 64 in flight so hangs do not starve the rest.
        default_factory=lambda: {"timeout_seconds": 2, "max_in_flight": 64}
    )
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_world_s: float = 120.0
    settle_s: float = 30.0
    only_final: bool = False

    def simulator_config(self) -> SimulatorConfig:
        return SimulatorConfig(
            batches=self.batches,
            calls_per_batch=self.calls_per_batch,
            api_key=API_KEY,
            seed=self.seed,
            concurrency=self.concurrency,
            redial_probability=self.redial_probability,
            faults=self.faults,
            timing=self.timing,
            record_served=not self.only_final,
        )


@dataclass
class Outcome:
    scenario: Scenario
    report: Report
    watch: FleetWatch
    receiver: dict[str, int]
    log_actions: Counter[str]
    missing_by_cause: Counter[str]
    polling_examples: list[str]
    world_s: float
    settle_s: float
    kills: int
    exit_codes: list[int | None]
    # Every distinct body the receiver got, against its published schema (docs/events/).
    schemas: SchemaCheck

    def __str__(self) -> str:
        return "\n".join(
            [
                f"== scenario {self.scenario.name}: world {self.world_s:.1f}s, settled in "
                f"{self.settle_s:.1f}s, {self.kills} SIGKILLs, exit codes {self.exit_codes}",
                str(self.report),
                str(self.schemas),
                f"missing by cause: {dict(self.missing_by_cause)} (polling: the bridge never "
                f"committed the event; delivery: committed, never delivered)",
                *(f"lost by polling: {e}" for e in self.polling_examples),
                f"fleet: {self.watch.figures()}",
                f"first commit per batch (s after start): "
                f"{ {b: round(s, 1) for b, s in sorted(self.watch.first_commit_s.items())} }",
                f"receiver: {self.receiver}",
                f"bridge warnings by action: {dict(self.log_actions.most_common())}",
            ]
        )


def write_config(path: Path, upstream: str, redis_url: str, hook: str, sc: Scenario,
                 batches: list[str]) -> Path:  # fmt: skip
    """A config with only what the scenario sets; everything else at its default."""
    config: dict[str, Any] = {
        "upstream": {"base_url": upstream, "api_key": "${KEY}"},
        "redis": {"url": redis_url},
        "poller": {},
        "batches": [{"id": b} for b in batches],
        "subscriptions": [{"name": "crm", "url": hook, "secret": SECRET, **sc.subscription}],
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_seconds": 2},
        "admin": {"token": ADMIN_TOKEN},
        "logging": {"format": "json"},
    }
    if sc.poll_interval_s is not None:
        config["poller"]["interval_seconds"] = sc.poll_interval_s
    for section, values in sc.sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


async def run_scenario(
    sc: Scenario,
    *,
    tmp_path: Path,
    redis_url: str,
    aiohttp_server: ServerFactory,
    chaos: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> Outcome:
    """Run `sc` to the end and judge it; prints and returns the figures. `chaos`, when
    given, runs beside the world from its start (e.g. it kills the Redis primary)."""
    clock = time.monotonic
    rng = random.Random(f"kills:{sc.seed}")
    sim = Simulator(sc.simulator_config(), clock=clock)
    upstream = await aiohttp_server(make_app(sim))
    receiver = FlakyReceiver(
        SECRET, fail_share=sc.receiver_fail_share, hang_seconds=sc.hang_seconds, seed=sc.seed
    )
    hook = await aiohttp_server(receiver.app())
    config = write_config(
        tmp_path / "config.yaml",
        str(upstream.make_url("")),
        redis_url,
        str(hook.make_url("/hook")),
        sc,
        sim.batch_ids,
    )
    replicas = [Replica(config, tmp_path / f"replica{i}.log") for i in range(sc.replicas)]
    watch = FleetWatch()
    stop_clock = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=2)
    kills = 0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for replica in replicas:
            await replica.start()
        for replica in replicas:
            await replica.wait_healthy(session)
        started = clock()
        wall_started = time.time()  # the bridge's timelines are in wall-clock ms
        tasks = [
            asyncio.create_task(run_clock(sim, sc.timing.step_seconds, stop_clock)),
            asyncio.create_task(watch.run(replicas, session, started)),
            *([asyncio.create_task(chaos())] if chaos is not None else []),
        ]
        kill_at = sorted(rng.uniform(*sc.kill_window_s) for _ in range(sc.kills))
        try:
            while not sim.is_finished() or kill_at:
                await asyncio.sleep(0.1)
                if kill_at and clock() - started >= kill_at[0]:
                    kill_at.pop(0)
                    victim = replicas[rng.randrange(len(replicas))]
                    await victim.kill()
                    kills += 1
                    await victim.start()
                if clock() - started > sc.max_world_s:
                    raise AssertionError(f"the world did not finish in {sc.max_world_s}s")
            world_s = clock() - started
            stop_clock.set()
            await _settle(sim, receiver, sc.settle_s)
            settle_s = clock() - started - world_s
            now = clock()
            report = check(
                sim.spans(),
                receiver.requests,
                poll_interval_s=sc.poll_interval_s or 5.0,
                outages=sim.outages(now),
                now=now,
                only_final=sc.only_final,
                served=sim.served if not sc.only_final else None,
            )
            examples: list[str] = []
            causes = await attribute_missing(
                report,
                receiver,
                replicas,
                session,
                examples=examples,
                truth=_truth(sim, started),
                wall_zero=wall_started,
            )
        finally:
            stop_clock.set()
            receiver.release.set()
            exit_codes = [await r.stop() for r in replicas]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    _dump(tmp_path, receiver, report, started)
    actions: Counter[str] = Counter()
    for replica in replicas:
        actions.update(replica.log_actions())
    outcome = Outcome(
        sc,
        report,
        watch,
        receiver.figures(),
        actions,
        causes,
        examples,
        world_s,
        settle_s,
        kills,
        exit_codes,
        check_bodies((r.id, r.body) for r in receiver.requests),
    )
    print(outcome)
    return outcome


def _truth(sim: Simulator, started: float) -> Callable[[str, str], str]:
    """A call's real statuses (start, seconds after the world started) and, for each,
    when the platform served the call: the evidence for a status lost by polling."""
    spans = sim.spans()

    def describe(batch_id: str, call_id: str) -> str:
        served = sim.served.get((batch_id, call_id), [])
        parts = []
        for span in spans:
            if (span.batch_id, span.call_id) != (batch_id, call_id):
                continue
            end = span.end if span.end is not None else math.inf
            at = [f"{t - started:.2f}" for t in served if span.start <= t < end]
            parts.append(f"{span.status}@{span.start - started:.2f} served {at}")
        return ", ".join(parts)

    return describe


def _dump(tmp_path: Path, receiver: FlakyReceiver, report: Report, started: float) -> None:
    """Leave the run's evidence next to the bridge logs: every request the receiver got
    (seconds after the world started) and the report's figures."""
    with (tmp_path / "receiver.jsonl").open("wb") as out:
        for r in receiver.requests:
            doc = r.payload()
            data = doc.get("data", {})
            row = {
                "t": round(r.at - started, 3),
                "id": r.id,
                "attempt": r.attempt,
                "answer": r.answer,
                "type": doc.get("type"),
                "call": data.get("call_id"),
                "seq": data.get("sequence"),
            }
            out.write(orjson.dumps(row) + b"\n")
    figures = {
        **report.figures(),
        "missing_list": [dataclasses.asdict(m) for m in report.missing[:2000]],
    }
    (tmp_path / "report.json").write_bytes(orjson.dumps(figures, default=str))


async def attribute_missing(
    report: Report,
    receiver: FlakyReceiver,
    replicas: list[Replica],
    session: aiohttp.ClientSession,
    limit: int = 1000,
    examples: list[str] | None = None,
    truth: Callable[[str, str], str] | None = None,
    wall_zero: float = 0.0,
) -> Counter[str]:
    """Why each missing status is missing, from the bridge's call timelines (admin API):
    "delivery" when the bridge committed more ``call.<status>`` events for the call than
    arrived, else "polling" (it never saw, or never emitted, that status). Calls past
    `limit` are "unclassified". `examples` receives the first few polling losses, with
    the bridge's timeline of the call and, when `truth` is given, what the platform
    really did and when it served the call."""
    causes: Counter[str] = Counter()
    live = next((r for r in replicas if r.alive), None)
    shortfall: Counter[tuple[str, str, str]] = Counter(
        (m.batch_id, m.call_id, m.status) for m in report.missing
    )
    delivered: Counter[tuple[str, str, str]] = Counter()
    for r in receiver.first_delivery().values():
        doc = r.payload()
        data = doc["data"]
        if doc["type"] == f"call.{data.get('status')}":  # status events, not call.updated
            delivered[(data["batch_id"], data["call_id"], data["status"])] += 1
    timelines: dict[tuple[str, str], list[dict[str, Any]] | None] = {}
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for (batch_id, call_id, status), short in shortfall.items():
        key = (batch_id, call_id)
        if key not in timelines and live is not None and len(timelines) < limit:
            url = f"{live.url}/v1/batches/{batch_id}/calls/{call_id}/timeline"
            try:
                async with session.get(url, headers=headers) as response:
                    doc = await response.json() if response.status == 200 else {}
            except aiohttp.ClientError:
                doc = {}
            timelines[key] = (doc.get("data") or {}).get("timeline", [])
        entries = timelines.get(key)
        if entries is None:
            causes["unclassified"] += short
            continue
        committed = sum(1 for e in entries if e.get("event_type") == f"call.{status}")
        stuck = min(short, max(0, committed - delivered[(batch_id, call_id, status)]))
        causes["delivery"] += stuck
        causes["polling"] += short - stuck
        if examples is not None and short > stuck and len(examples) < 5:
            m = next(
                m
                for m in report.missing
                if (m.batch_id, m.call_id, m.status) == (batch_id, call_id, status)
            )
            seen = [
                (
                    e.get("status"),
                    e.get("event_type"),
                    round(e.get("at_ms", 0) / 1000 - wall_zero, 2),
                )
                for e in entries
            ]
            examples.append(
                f"{batch_id}/{call_id} {status} visible {m.visible_s:.1f}s; "
                f"the bridge's timeline: {seen}"
                + (f"; the platform: {truth(batch_id, call_id)}" if truth else "")
            )
    return causes


async def _settle(
    sim: Simulator, receiver: FlakyReceiver, limit_s: float, quiet_s: float = 3.0
) -> None:
    """Until every call's final status and every batch's batch.completed arrived and the
    receiver has been quiet for `quiet_s`, or `limit_s` passed."""
    finals = {(b, c["call_id"]): c["status"] for b in sim.batch_ids for c in sim.calls(b)}
    pending = {key for key, status in finals.items() if status != "pending"}
    batches = set(sim.batch_ids)
    seen = 0
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for r in receiver.requests[seen:]:
            if not r.ok:
                continue
            data = r.payload()["data"]
            if "call_id" not in data:
                batches.discard(data["batch_id"])
            elif finals.get((data["batch_id"], data["call_id"])) == data.get("status"):
                pending.discard((data["batch_id"], data["call_id"]))
        seen = len(receiver.requests)
        last = receiver.requests[-1].at if receiver.requests else 0.0
        if not pending and not batches and time.monotonic() - last >= quiet_s:
            return
        await asyncio.sleep(0.5)


async def wait_until(condition: Callable[[], bool], limit_s: float, every_s: float = 0.2) -> bool:
    """Poll `condition` every `every_s` until it holds (True) or `limit_s` passed (False)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every_s)
    return True


async def until(
    check: Callable[[], Awaitable[bool]], *, within_s: float = 5.0, every_s: float = 0.01
) -> None:
    """Await `check` until it holds, failing the test after `within_s`: bounded polling
    of what another clock or process does (a breaker's pause, a subprocess, a replica's
    sync), never of the test's own work (that is awaited: run_once, poll_once)."""
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(every_s)


async def serve_on(app: web.Application, port: int) -> web.AppRunner:
    """Serve `app` on 127.0.0.1:`port` (a port chosen earlier, e.g. one that refused)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


__all__ = [
    "PLATFORM_FAULTS",
    "FleetWatch",
    "Outcome",
    "Scenario",
    "run_scenario",
    "serve_on",
    "wait_until",
    "write_config",
]
