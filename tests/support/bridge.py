"""Running the real `callbridge run` as subprocesses, for crash and replica tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from callbridge.simulator import Simulator
from tests.support.receivers import Receiver
from tests.support.servers import free_port
from tests.support.settings import API_KEY, SECRET


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


async def start_bridge(config: Path) -> asyncio.subprocess.Process:
    """`callbridge run` in a subprocess."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "callbridge", "run", "--config", str(_own_port(config)),
        env={**os.environ, "KEY": API_KEY},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


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


class Replica:
    """One `callbridge run` process of a fleet, restartable, its logs kept in a file.

    Each start gets a fresh free port (`url`), so a restarted replica is a new process
    as it would be in a pod; `log` collects every start's stderr (JSON lines when the
    config says ``logging.format: json``).
    """

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.starts = 0

    async def start(self) -> None:
        port = free_port()
        own = self.config.with_name(f"{self.config.stem}-{port}.yaml")
        own.write_text(self.config.read_text().replace("port: 0", f"port: {port}"))
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "callbridge", "run", "--config", str(own),
                env={**os.environ, "KEY": API_KEY},
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_healthy(self, session: aiohttp.ClientSession, seconds: float = 20) -> None:
        """Until ``/healthz`` answers 200 (the loops run)."""
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            if not self.alive:
                raise RuntimeError(f"bridge exited early; see {self.log}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/healthz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"bridge not healthy after {seconds}s; see {self.log}")

    async def kill(self) -> None:
        """SIGKILL: no shutdown, no lease release, claims left in flight."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self, seconds: float = 30) -> int | None:
        """SIGTERM and wait; the exit code."""
        if self.proc is None:
            return None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), seconds)
        except TimeoutError:
            await self.kill()
        return self.proc.returncode

    async def metrics(
        self, session: aiohttp.ClientSession
    ) -> dict[tuple[str, tuple[Any, ...]], float]:
        """``/metrics`` as {(sample name, sorted labels): value}; empty when unreachable."""
        if not self.alive:
            return {}
        try:
            async with session.get(f"{self.url}/metrics") as response:
                text = await response.text()
        except aiohttp.ClientError:
            return {}
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def log_actions(self) -> Counter[str]:
        """How often each ``action`` was logged at WARNING or above (JSON logs)."""
        counts: Counter[str] = Counter()
        if not self.log.exists():
            return counts
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("level") in ("warning", "error"):
                    counts[str(doc.get("action", "?"))] += 1
        return counts
