"""Running the real `callbridge run` as subprocesses (crash and replica tests), and
pausing an in-process bridge's loops so a test drives its work."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

import yaml

from callbridge.app import Bridge
from callbridge.simulator import Simulator
from tests.support.receivers import Receiver
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET


async def pause_loops(bridge: Bridge) -> None:
    """Stop a served bridge's own poll and delivery loops; its HTTP surface stays up.

    The test then does the work with `poll_once` / `drain`, so nothing is still in
    flight when it looks (leases are kept: the replica still owns its batches).
    """
    bridge.stopping.set()
    await asyncio.gather(*bridge.tasks)


def write_config(
    path: Path,
    upstream_url: str,
    redis_url: str,
    hook_url: str,
    batches: list[str],
    **overrides: Any,
) -> Path:
    config: dict[str, Any] = {
        "upstream": {
            "base_url": upstream_url,
            "api_key": "${KEY}",
            "page_size": 10,
            "max_requests_per_second": 500,
            "backoff_max_seconds": 0.05,
        },
        "redis": {"url": redis_url},
        "poller": {"interval_seconds": 0.1, "lease_ttl_seconds": 2, "jitter_ratio": 0},
        "batches": [{"id": b} for b in batches],
        "subscriptions": [
            {
                "name": "crm",
                "url": hook_url,
                "secret": SECRET,
                "timeout_seconds": 2,
                "retry_schedule_seconds": [0.2] * 20,
            }
        ],
        "delivery": {"visibility_margin_seconds": 1, "idle_poll_seconds": 0.05},
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_seconds": 2},
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def _own_port(config: Path) -> Path:
    """A copy of the config with a free HTTP port, one per process."""
    port = free_port()
    own = config.with_name(f"{config.stem}-{port}.yaml")
    own.write_text(config.read_text().replace("port: 0", f"port: {port}"))
    return own


def _output(log: Path | None) -> IO[bytes]:
    return (log or Path(os.devnull)).open("wb")


async def start_bridge(config: Path, log: Path | None = None) -> asyncio.subprocess.Process:
    """`callbridge run` in a subprocess; its output goes to `log` when given."""
    with _output(log) as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "callbridge", "run", "--config", str(_own_port(config)),
            env={**os.environ, "KEY": API_KEY},
            stdout=out, stderr=out,
        )  # fmt: skip


async def stop_bridge(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 10 s; always reaps the child."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def final_statuses_delivered(sim: Simulator, receiver: Receiver) -> bool:
    """Every call's final status and every batch.completed reached the receiver."""
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    batches_done: set[str] = set()
    for r in receiver.delivered:
        p = r.payload()
        if p["type"] == "batch.completed":
            batches_done.add(p["data"]["batch_id"])
        else:
            seen[(p["data"]["batch_id"], p["data"]["call_id"])].add(p["data"]["status"])
    if batches_done != set(sim.batch_ids):
        return False
    return all(
        sim.history(b, c["call_id"])[-1][1] in seen[(b, c["call_id"])]
        for b in sim.batch_ids
        for c in sim.calls(b)
    )


async def wait_until_delivered(sim: Simulator, receiver: Receiver, *, rounds: int = 600) -> None:
    for _ in range(rounds):
        if final_statuses_delivered(sim, receiver):
            return
        await asyncio.wait_for(receiver.arrived.wait(), 30)
        receiver.arrived.clear()


def check_consistency(sim: Simulator, receiver: Receiver) -> None:
    """No id under two payloads; every reported status is one the call really had."""
    receiver.verify_all(SECRET)
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for r in receiver.received:
        bodies[r.id].add(r.body)
    twice = [i for i, b in bodies.items() if len(b) > 1]
    assert not twice, f"event ids delivered with different payloads: {twice[:3]}"
    per_call_seq: dict[tuple[str, str, int], str] = {}
    for r in receiver.delivered:
        p = r.payload()
        if p["type"] == "batch.completed":
            continue
        d = p["data"]
        truth = [s for _, s in sim.history(d["batch_id"], d["call_id"])]
        assert d["status"] in truth
        key = (d["batch_id"], d["call_id"], d["sequence"])
        # One transition per (call, sequence): two emitters would disagree here.
        assert per_call_seq.setdefault(key, r.id) == r.id, key
