"""A real primary, a replica and three Sentinels on loopback (the Valkey binary, or a
TLS-capable ``redis-server`` for the TLS runs), with a short ``down-after-milliseconds``
so a SIGKILLed primary is replaced within seconds."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from callbridge.store.embedded import find_server_binary
from tests.support.servers import free_port, start_server

SERVICE = "mymaster"


@dataclass
class SentinelGroup:
    """Started by `start()`; `url` names it for the bridge."""

    root: Path
    down_after_ms: int = 1000
    binary: str = field(default_factory=find_server_binary)
    # Extra arguments for every data node and Sentinel (TLS, ACL users...).
    node_args: Sequence[str] = ()
    sentinel_lines: Sequence[str] = ()
    # How the test talks to a node or a Sentinel: (port) -> a sync client.
    client: Callable[[int], redis.Redis] = lambda port: redis.Redis(port=port)
    tls: bool = False
    # Replicas of the primary (`min_replicas_to_ack: 1` wants two: one is left after a
    # failover while the old primary is down).
    replicas: int = 1
    ports: list[int] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def url(self, userinfo: str = "") -> str:
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"{scheme}://{userinfo}{hosts}/{SERVICE}"

    def start(self) -> SentinelGroup:
        self.ports = [free_port() for _ in range(1 + self.replicas)]
        primary = self.ports[0]
        self._data_node(primary)
        for replica in self.ports[1:]:
            self._data_node(replica, "--replicaof", "127.0.0.1", str(primary))
        for _ in range(3):
            port = free_port()
            self.sentinel_ports.append(port)
            conf = self.root / f"sentinel{port}.conf"
            conf.write_text(self._sentinel_conf(port, primary))
            self.procs[port] = subprocess.Popen(
                [self.binary, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.wait_until(self._settled, "the Sentinels did not find each other and the replica")
        return self

    def _data_node(self, port: int, *extra: str) -> None:
        # A replica's first sync at once (the default waits 5 s for more replicas).
        args = ["--repl-diskless-sync-delay", "0", *self.node_args, *extra]
        if self.tls:  # the TLS port is the node's only port (tests.support.tls_server)
            args = [*args, "--port", "0", "--tls-port", str(port)]
        self.procs[port] = start_server(
            self.root / f"node{port}", port, *args, binary=self.binary, client=self.client
        )

    def _sentinel_conf(self, port: int, primary: int) -> str:
        ports = ["port 0", f"tls-port {port}"] if self.tls else [f"port {port}"]
        return "\n".join(
            [
                *ports,
                "bind 127.0.0.1",
                f"dir {self.root}",
                *self.sentinel_lines,
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2",
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
                f"sentinel failover-timeout {SERVICE} 10000",
                "",
            ]
        )

    def primary_port(self) -> int | None:
        """The primary's port as a majority of the live Sentinels name it."""
        named: list[int] = []
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                address = self.client(port).sentinel_get_master_addr_by_name(SERVICE)
                if address:
                    named.append(int(address[1]))
        best = max(set(named), key=named.count, default=None)
        return best if best is not None and named.count(best) >= 2 else None

    def _settled(self) -> bool:
        for port in self.sentinel_ports:
            try:
                state = self.client(port).sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < self.replicas:
                return False
        with contextlib.suppress(redis.RedisError):
            links = [
                self.client(p).info("replication")["master_link_status"] for p in self.ports[1:]
            ]
            return all(link == "up" for link in links)
        return False

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(10)

    def restart(self, port: int) -> None:
        """The killed node back on its port and data (Sentinel makes it a replica)."""
        self._data_node(port)

    def wait_until(self, done: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(what)
            time.sleep(0.05)  # polling external processes, bounded

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
