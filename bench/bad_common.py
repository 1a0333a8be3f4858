"""What the bad-days benchmarks share: the receiver process, the on-call subscription,
a sampler of the bridge's delivery metrics, signed requests from the bench process.

The sampler reads the bridge's ``/metrics`` every `SAMPLE_EVERY_S` while a scenario
runs and keeps, per sample, the subscription's adaptive concurrency limit, its moves
by reason, detached and promoted requests, the breaker's state and the queue depth
(``callbridge_delivery_concurrency_limit``, ``_concurrency_changes_total``,
``_detached_total``, ``_promoted_total``, ``callbridge_subscription_breaker_state``,
``callbridge_queue_depth``; the last two are refreshed by the bridge every 2 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.common import SECRET, Bridge, Server, child_server, parse_metrics, quantile
from callbridge.config import decode_whsec
from callbridge.deliver.signing import signature_headers

SUB = "crm"
ONCALL = "oncall"
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class BadReceiver:
    """A `bench.bad_receiver` process: its control URL, the hook and on-call URLs."""

    control: Server
    hook_url: str
    ops_url: str

    @property
    def url(self) -> str:
        return self.control.url

    def cpu_s(self) -> float:
        return self.control.cpu_s()


@contextlib.contextmanager
def bad_receiver(args: Sequence[str], log_name: str) -> Iterator[BadReceiver]:
    import json
    import urllib.request

    with child_server("bench.bad_receiver", args, log_name) as control:
        with urllib.request.urlopen(control.url + "/_info", timeout=10) as resp:  # noqa: S310
            info = json.loads(resp.read())
        yield BadReceiver(control, info["hook_url"], info["ops_url"])


def crm_subscription(receiver: BadReceiver, **settings: Any) -> dict[str, Any]:
    return {"name": SUB, "url": receiver.hook_url, "secret": SECRET, **settings}


def oncall_subscription(receiver: BadReceiver) -> dict[str, Any]:
    """An on-call channel: the operational events, at the receiver's control server
    (which stays up while the CRM is down)."""
    return {
        "name": ONCALL,
        "url": receiver.ops_url,
        "secret": SECRET,
        "events": ["subscription.*", "delivery.dead_lettered"],
    }


async def get_json(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as resp:
        resp.raise_for_status()
        return orjson.loads(await resp.read())


def _sum(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(
        v
        for lab, v in samples.get(name, [])
        if all(lab.get(k) == want for k, want in labels.items())
    )


@dataclass
class MetricsSampler:
    """Samples the bridge's delivery metrics for subscription `SUB` (see the module doc)."""

    bridge: Bridge
    session: aiohttp.ClientSession
    every_s: float = SAMPLE_EVERY_S
    rows: list[dict[str, Any]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def sample(self) -> dict[str, Any]:
        async with self.session.get(self.bridge.url + "/metrics") as resp:
            m = parse_metrics(await resp.text())
        changes = {
            lab["reason"]: v
            for lab, v in m.get("callbridge_delivery_concurrency_changes_total", [])
            if lab.get("subscription") == SUB
        }
        breaker = next(
            (
                lab["state"]
                for lab, v in m.get("callbridge_subscription_breaker_state", [])
                if lab.get("subscription") == SUB and v == 1
            ),
            "closed",
        )
        depth = {
            lab["state"]: v
            for lab, v in m.get("callbridge_queue_depth", [])
            if lab.get("subscription") == SUB
        }
        cycles: dict[str, float] = {}
        for lab, v in m.get("callbridge_poll_cycles_total", []):
            cycles[lab["batch"]] = cycles.get(lab["batch"], 0.0) + v
        return {
            "t": time.time(),
            "cycles": cycles,
            "limit": _sum(m, "callbridge_delivery_concurrency_limit", subscription=SUB),
            "changes": changes,
            "detached": _sum(m, "callbridge_delivery_detached_total", subscription=SUB),
            "promoted": _sum(m, "callbridge_delivery_promoted_total", subscription=SUB),
            "breaker": breaker,
            "depth": depth,
            "attempts": _by_outcome(m),
            "duration_sum": _sum(m, "callbridge_delivery_duration_seconds_sum", subscription=SUB),
            "duration_count": _sum(
                m, "callbridge_delivery_duration_seconds_count", subscription=SUB
            ),
        }

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                self.rows.append(await self.sample())
            await asyncio.sleep(max(0.0, self.every_s - (time.monotonic() - started)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            self.rows.append(await self.sample())

    def last(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def series(self, t0: float) -> dict[str, list[float]]:
        """Seconds since `t0` and the limit, for the plots and the JSON."""
        return {
            "t_s": [round(r["t"] - t0, 2) for r in self.rows],
            "limit": [r["limit"] for r in self.rows],
            "detached": [r["detached"] for r in self.rows],
            "backlog": [
                sum(v for k, v in r["depth"].items() if k in ("ready", "scheduled", "waiting"))
                for r in self.rows
            ],
            "breaker_open": [0 if r["breaker"] == "closed" else 1 for r in self.rows],
        }

    def poll_gaps(self, since: float, until: float) -> dict[str, float]:
        """Per batch, the longest time in [since, until] without a poll cycle ending (as
        sampled): a batch whose polling stalled shows here."""
        gaps: dict[str, float] = {}
        last: dict[str, tuple[float, float]] = {}  # batch -> (count, since when)
        for r in self.rows:
            if r["t"] > until:
                break
            for batch, n in r["cycles"].items():
                count, at = last.get(batch, (-1.0, max(since, r["t"])))
                if n != count:
                    if count >= 0 and r["t"] >= since:
                        gaps[batch] = max(gaps.get(batch, 0.0), r["t"] - at)
                    last[batch] = (n, max(since, r["t"]))
        for batch, (_n, at) in last.items():
            gaps[batch] = max(gaps.get(batch, 0.0), min(until, self.rows[-1]["t"]) - at)
        return gaps

    def stalled(self, limit_s: float) -> dict[str, float]:
        """Batches whose poll cycle count has not moved for `limit_s` (as sampled), with
        the seconds since it last did."""
        if not self.rows:
            return {}
        now, last = self.rows[-1]["t"], self.rows[-1]["cycles"]
        out: dict[str, float] = {}
        for batch, n in last.items():
            since = now
            for r in reversed(self.rows):
                if r["cycles"].get(batch) != n:
                    break
                since = r["t"]
            if now - since >= limit_s:
                out[batch] = now - since
        return out

    def limit_stats(self, since: float, until: float) -> dict[str, float]:
        values = [r["limit"] for r in self.rows if since <= r["t"] <= until]
        return {
            "min": min(values, default=float("nan")),
            "p50": quantile(values, 0.5),
            "max": max(values, default=float("nan")),
        }


def _by_outcome(m: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for lab, v in m.get("callbridge_delivery_attempts_total", []):
        if lab.get("subscription") == SUB:
            out[lab["outcome"]] = out.get(lab["outcome"], 0.0) + v
    return out


def signed_post_args(event_id: str, body: bytes) -> dict[str, Any]:
    """Headers and body of a request signed as the bridge signs (for the bench's own
    requests to the receiver, which verifies every signature)."""
    headers = signature_headers([decode_whsec(SECRET)], event_id, int(time.time()), body)
    return {"data": body, "headers": {**headers, "Content-Type": "application/json"}}


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_s": quantile(values, 0.5),
        "p99_s": quantile(values, 0.99),
        "max_s": max(values, default=float("nan")),
    }
