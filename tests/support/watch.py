"""Watching a fleet of bridge replicas through their ``/metrics``, as Prometheus would."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.support.replicas import Replica


@dataclass
class FleetWatch:
    """What the replicas' ``/metrics`` showed, sampled every `every_s`."""

    every_s: float = 0.5
    breaker_opens: int = 0
    breaker_open_s: float = 0.0
    first_breaker_open_s: float | None = None
    first_commit_s: dict[str, float] = field(default_factory=dict)
    fenced_by_process: dict[tuple[int, int], float] = field(default_factory=dict)
    cycles_by_process: dict[tuple[int, int], Counter[str]] = field(default_factory=dict)
    samples: int = 0

    @property
    def fenced(self) -> int:
        return int(sum(self.fenced_by_process.values()))

    def cycles(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.cycles_by_process.values():
            total.update(counts)
        return total

    async def run(
        self, replicas: list[Replica], session: aiohttp.ClientSession, started: float
    ) -> None:
        was_open = False
        while True:
            await asyncio.sleep(self.every_s)
            now = time.monotonic() - started
            states = []
            for index, replica in enumerate(replicas):
                samples = await replica.metrics(session)
                if not samples:
                    continue
                self.samples += 1
                process = (index, replica.starts)
                cycles: Counter[str] = Counter()
                for (name, labels), value in samples.items():
                    tags = dict(labels)
                    if name == "callbridge_subscription_breaker_open":
                        states.append(value >= 1)
                    elif name == "callbridge_poll_cycles_total":
                        cycles[tags["outcome"]] += int(value)
                        if tags["outcome"] == "committed" and value > 0:
                            self.first_commit_s.setdefault(tags["batch"], now)
                self.cycles_by_process[process] = cycles
                self.fenced_by_process[process] = cycles["fenced"]
            is_open = any(states)
            if is_open:
                self.breaker_open_s += self.every_s
                if self.first_breaker_open_s is None:
                    self.first_breaker_open_s = now
            if is_open and not was_open:
                self.breaker_opens += 1
            if states:
                was_open = is_open

    def figures(self) -> dict[str, Any]:
        return {
            "breaker_opens": self.breaker_opens,
            "breaker_open_s": round(self.breaker_open_s, 1),
            "fenced_cycles": self.fenced,
            "cycles": dict(sorted(self.cycles().items())),
        }
