"""A real Prometheus server for tests and the dashboard picture (Debian's ``prometheus``).

It scrapes the given targets every second, evaluates the given rule groups every
second, and is read through its own HTTP API (``/api/v1/...``), as Grafana and
Alertmanager read it. There is deliberately no skip when the binary is missing:
`.ci/run` installs the package, and a silent skip would leave the alert rules and
the dashboard unproven.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import yaml

from tests.support.servers import free_port

T = TypeVar("T")

# How the release's series are labelled by the chart's ServiceMonitor in a cluster; the
# static scrape config below adds the same labels, so the chart's default
# metricSelector (namespace + job) and the dashboard's variables select them.
NAMESPACE = "callbridge"
JOB = "cb-callbridge"
SCRAPE_INTERVAL_S = 1


def binary(name: str) -> str:
    """Path of `name` (``prometheus`` or ``promtool``); fails loudly when absent."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found: install Debian's prometheus package "
            "(apt-get install prometheus; .ci/run does this)"
        )
    return path


def config(targets: Sequence[str], rule_files: Sequence[str] = ()) -> dict[str, Any]:
    """A Prometheus config scraping `targets` (host:port) as the chart's release would be."""
    interval = f"{SCRAPE_INTERVAL_S}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": list(rule_files),
        "scrape_configs": [
            {
                "job_name": JOB,
                "scrape_timeout": interval,
                "static_configs": [{"targets": list(targets), "labels": {"namespace": NAMESPACE}}],
            }
        ],
    }


class PrometheusError(RuntimeError):
    """The Prometheus API refused a request (a bad query, most likely)."""


@dataclass
class Prometheus:
    """A running Prometheus and a client for its HTTP API."""

    url: str
    session: aiohttp.ClientSession

    async def _get(self, path: str, **params: str) -> Any:
        async with self.session.get(self.url + path, params=params) as resp:
            doc = await resp.json()
        if doc.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result as Prometheus returns it (vector items)."""
        data = await self._get("/api/v1/query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: expected a vector, got {data['resultType']}")
        result: list[dict[str, Any]] = data["result"]
        return result

    async def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[dict[str, Any]]:
        """A range query: one item per series, with ``values`` as [[t, "v"], ...]."""
        data = await self._get(
            "/api/v1/query_range", query=expr, start=str(start), end=str(end), step=str(step_s)
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    async def metric_names(self) -> set[str]:
        return set(await self._get("/api/v1/label/__name__/values"))

    async def alerts(self) -> dict[str, str]:
        """Alert name -> its state (``pending`` or ``firing``); the worst when several."""
        states: dict[str, str] = {}
        for alert in (await self._get("/api/v1/alerts"))["alerts"]:
            name = alert["labels"]["alertname"]
            if states.get(name) != "firing":
                states[name] = alert["state"]
        return states

    async def targets_up(self) -> bool:
        active = (await self._get("/api/v1/targets"))["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


async def wait_for(
    check: Callable[[], Awaitable[T | None]], *, timeout_s: float, what: str, every_s: float = 0.2
) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(every_s)


def _prepare(workdir: Path, targets: Sequence[str], rule_groups: Mapping[str, Any] | None) -> Path:
    """Write the config (and rule file) under `workdir`; returns the config's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    rule_files = []
    if rule_groups is not None:
        (workdir / "rules.yaml").write_text(yaml.safe_dump(dict(rule_groups)))
        rule_files.append("rules.yaml")
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config(targets, rule_files)))
    return path


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


@contextlib.asynccontextmanager
async def running_prometheus(
    workdir: Path,
    targets: Sequence[str],
    rule_groups: Mapping[str, Any] | None = None,
) -> AsyncIterator[Prometheus]:
    """Start Prometheus on a free port scraping `targets`; stopped (and reaped) on exit.

    Its log is ``workdir/prometheus.log``. Prometheus applies new scrape targets on a
    5 s tick, so the first scrape comes about 5 s after the start.
    """
    config_path = _prepare(workdir, targets, rule_groups)
    log_path = workdir / "prometheus.log"
    port = free_port()
    with _open_log(log_path) as log:
        proc = await asyncio.create_subprocess_exec(
            binary("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        async with aiohttp.ClientSession() as session:
            prom = Prometheus(f"http://127.0.0.1:{port}", session)

            async def ready() -> bool:
                if proc.returncode is not None:
                    raise RuntimeError(
                        f"prometheus exited with {proc.returncode}: {_tail(log_path)}"
                    )
                try:
                    async with session.get(prom.url + "/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout_s=30, what="Prometheus to be ready", every_s=0.05)
            yield prom
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
