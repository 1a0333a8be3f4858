"""A fleet of real `callbridge run` processes: restartable replicas with their logs and
metrics, for turbulence scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import free_port
from tests.support.settings import API_KEY


class Replica:
    """One `callbridge run` process of a fleet, restartable, its logs kept in a file.

    Each start gets a fresh free port (`url`), so a restarted replica is a new process
    as it would be in a pod, under the same ``server.replica_id`` (the log's name), as
    a pod's restarted container keeps its hostname; `log` collects every start's
    stderr (JSON lines when the config says ``logging.format: json``).
    """

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = env or {}  # beside the test's own environment (e.g. OTEL_*)
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.starts = 0

    async def start(self) -> None:
        port = free_port()
        own = self.config.with_name(f"{self.config.stem}-{port}.yaml")
        server = f"port: {port}\n  replica_id: {self.log.stem}"
        own.write_text(self.config.read_text().replace("port: 0", server))
        self.url = f"http://127.0.0.1:{port}"
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "callbridge", "run", "--config", str(own),
                env={**os.environ, "KEY": API_KEY, **self.env},
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
