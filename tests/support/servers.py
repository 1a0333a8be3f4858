"""Real servers for tests: free ports and Valkey processes (AOF on, as in production)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from callbridge.store.embedded import EmbeddedRedis, find_server_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_redis(
    port: int, seconds: float = 10.0, client: Callable[[int], redis.Redis] | None = None
) -> None:
    """Block until a server answers PING on the port (it may be loading its AOF);
    `client` makes the client to ask with (TLS, a password), plain by default."""
    probe = (client or _plain)(port)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if probe.ping():
                    return
            except redis.ConnectionError:  # BusyLoadingError included
                time.sleep(0.025)
        raise RuntimeError(f"no Redis answered on port {port}")
    finally:
        probe.close()


def _plain(port: int) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )


def start_server(
    data: Path,
    port: int,
    *extra: str,
    binary: str | None = None,
    client: Callable[[int], redis.Redis] | None = None,
) -> subprocess.Popen[bytes]:
    """A Valkey server (or `binary`) persisting to `data` (AOF), ready when this returns."""
    data.mkdir(parents=True, exist_ok=True)
    cmd = [*EmbeddedRedis(data).command(binary or find_server_binary(), port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_redis(port, client=client)
    return proc
