"""Shared plumbing for the benchmarks: a real Valkey server, child HTTP servers, settings.

Every server a benchmark needs is a separate process started here and stopped in a
``finally`` (context managers), so their CPU never counts against the bench process
and nothing outlives a run, even one that fails half-way.
"""

from __future__ import annotations

import contextlib
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from callbridge.config import Settings, parse_settings
from callbridge.store.embedded import EmbeddedRedis, find_server_binary

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
IMG = REPO / "docs" / "img"

API_KEY = "sk_bench_key"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
_READY_PREFIX = "READY "
_START_TIMEOUT_S = 120.0


def child_env() -> dict[str, str]:
    """The environment of a child process: this checkout's ``service`` and root first
    on ``PYTHONPATH`` (an editable install elsewhere would otherwise provide
    ``callbridge``, and a worktree's benchmark would measure another checkout's code)."""
    path = [str(REPO / "service"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    """A child server: where to reach it and its pid (to read its CPU time)."""

    url: str
    pid: int

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far (from /proc)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def valkey_server() -> Iterator[Server]:
    """A real Valkey server, started exactly as tests/support/servers.py does."""
    with tempfile.TemporaryDirectory(prefix="cb-bench-valkey-") as data:
        port = free_port()
        cmd = EmbeddedRedis(data).command(find_server_binary(), port)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        try:
            for _ in range(400):
                try:
                    if client.ping():
                        break
                except redis.ConnectionError:
                    time.sleep(0.025)
            else:
                raise RuntimeError("bench Valkey did not start")
            yield Server(f"redis://127.0.0.1:{port}/0", proc.pid)
        finally:
            client.close()
            stop_process(proc)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 10 s; always reaps the child."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def child_server(module: str, args: Sequence[str], log_name: str) -> Iterator[Server]:
    """Run ``python -m <module> --port 0 <args>``; the URL is the one it prints when ready.

    The child prints ``READY <url>`` on stdout once it listens; its stderr goes to
    ``bench/results/<log_name>.log``.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = child_env()
    with (RESULTS / f"{log_name}.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            yield Server(_wait_ready(proc, module), proc.pid)
        finally:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()


def _wait_ready(proc: subprocess.Popen[bytes], module: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{module} exited with {proc.returncode} before it was ready")
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline().decode().strip()
            if line.startswith(_READY_PREFIX):
                return line[len(_READY_PREFIX) :]
    raise RuntimeError(f"{module} was not ready within {_START_TIMEOUT_S:.0f}s")


def announce_ready(url: str) -> None:
    """Called by a child server once it listens."""
    sys.stdout.write(f"{_READY_PREFIX}{url}\n")
    sys.stdout.flush()


async def serve_child(app: Any, port: int) -> None:
    """A child server's life: serve `app` (an aiohttp application) on 127.0.0.1:`port`,
    announce its URL once it listens, stop on SIGTERM or SIGINT."""
    import asyncio
    import signal

    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        addresses: Any = runner.addresses
        announce_ready(f"http://127.0.0.1:{addresses[0][1]}")
        await stop.wait()
    finally:
        await runner.cleanup()


def make_settings(
    base_url: str,
    redis_url: str,
    *,
    subscriptions: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> Settings:
    """Settings like tests/support/settings.py builds, with a budget that never throttles."""
    raw: dict[str, Any] = {
        "upstream": {
            "base_url": base_url,
            "api_key": API_KEY,
            "page_size": 500,
            "max_requests_per_second": 100_000,
            "timeout_seconds": 60,
            "max_attempts": 1,
        },
        "redis": {"url": redis_url},
        "poller": {"interval_seconds": 5, "lease_ttl_seconds": 300},
        "subscriptions": subscriptions or [],
    }
    for name, value in sections.items():
        raw.setdefault(name, {}).update(value)
    return parse_settings(raw, env={})


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp
    import orjson

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "orjson": orjson.__version__,
        "valkey_binary": find_server_binary(),
        "loadavg_at_start": list(os.getloadavg()),
    }


async def redis_used_memory(client: Any) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


# -- the real bridge as a subprocess (``callbridge run``) ------------------------------


@dataclass
class Bridge:
    """A ``callbridge run`` child: its HTTP URL, its process, its config."""

    url: str
    proc: subprocess.Popen[bytes]
    config: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_s(self) -> float:
        return Server(self.url, self.proc.pid).cpu_s()


def bridge_config(
    base_url: str,
    redis_url: str,
    *,
    batches: Sequence[str] = (),
    subscriptions: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A config file's content for ``callbridge run`` (validated by `parse_settings`)."""
    raw: dict[str, Any] = {
        "upstream": {
            "base_url": base_url,
            "api_key": API_KEY,
            "page_size": 500,
            "max_requests_per_second": 100_000,
            "timeout_seconds": 30,
        },
        "redis": {"url": redis_url},
        "poller": {"interval_seconds": 1.0},
        "batches": [{"id": b} for b in batches],
        "subscriptions": subscriptions or [],
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_seconds": 5},
        "logging": {"format": "text", "level": "INFO"},
    }
    for name, value in sections.items():
        raw.setdefault(name, {}).update(value)
    parse_settings(raw, env={})  # fail here, not in the child, when the config is wrong
    return raw


@contextlib.contextmanager
def bridge_process(
    config: dict[str, Any], log_name: str, env: Mapping[str, str] | None = None
) -> Iterator[Bridge]:
    """``python -m callbridge run --config <file>`` (the ``callbridge run`` entry point).

    Ready once ``/readyz`` answers 200. Stopped with SIGTERM (then SIGKILL) in a
    ``finally``; a benchmark may SIGKILL it earlier itself. Logs go to
    ``bench/results/<log_name>.log``. `env`: added to the child's environment (e.g.
    ``OTEL_*``, or a ``PYTHONPATH`` naming another checkout's code to compare with).
    """
    import urllib.request

    import yaml

    RESULTS.mkdir(parents=True, exist_ok=True)
    config = {**config, "server": {**config.get("server", {}), "port": free_port()}}
    url = f"http://127.0.0.1:{config['server']['port']}"
    env = {**child_env(), **(env or {})}
    with (
        tempfile.TemporaryDirectory(prefix="cb-bench-bridge-") as tmp,
        (RESULTS / f"{log_name}.log").open("wb") as log,
    ):
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.Popen(
            [sys.executable, "-m", "callbridge", "run", "--config", str(path)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + _START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"callbridge run exited with {proc.returncode}; see {log_name}.log"
                    )
                try:
                    with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:  # noqa: S310
                        if resp.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("callbridge run was not ready in time")
                time.sleep(0.05)
            yield Bridge(url, proc, config)
        finally:
            stop_process(proc)


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> sample name -> [(labels, value)] (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of unsorted values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
