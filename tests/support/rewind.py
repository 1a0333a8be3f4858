"""A Redis failover that rewinds, for tests: a consistent copy of the keyspace taken
earlier and put back, as a promoted replica that had not received the last writes
holds it; a primary with a real replica whose acknowledgements can be stopped; and the
receiver-side checks a rewind must pass.

A promoted replica holds a prefix of the primary's writes: everything up to some
point, nothing after. `copy_keyspace` taken at that point and `restore_keyspace` after
the writes that follow reproduce exactly that state, on the same server, so the bridge
under test carries on against it as it would against the promoted replica.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from tests.support.receivers import Receiver
from tests.support.servers import free_port, start_server

Keyspace = list[tuple[bytes, int, bytes]]


async def copy_keyspace(client: aioredis.Redis) -> Keyspace:
    """Every key of the database with its remaining TTL (ms, 0 for none) and DUMP."""
    out: Keyspace = []
    async for key in client.scan_iter(count=1000):
        dumped = await client.dump(key)
        if dumped is not None:
            out.append((key, max(0, await client.pttl(key)), dumped))
    return out


async def restore_keyspace(client: aioredis.Redis, copy: Keyspace) -> None:
    """The database as `copy` had it: what came after is gone."""
    await client.flushdb()
    for key, ttl_ms, dumped in copy:
        await client.restore(key, ttl_ms, dumped, replace=True)


@dataclass
class ReplicatedRedis:
    """A primary and one replica (real Valkey processes, real replication)."""

    primary: subprocess.Popen[bytes]
    replica: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop_acks(self) -> None:
        """The replica stops reading (SIGSTOP): `WAIT` on the primary gets no ack."""
        self.replica.send_signal(signal.SIGSTOP)

    def resume_acks(self) -> None:
        self.replica.send_signal(signal.SIGCONT)

    async def synced(self, client: aioredis.Redis) -> None:
        """Until the replica has acknowledged every write made so far."""
        for _ in range(200):
            if await client.execute_command("WAIT", 1, 50) >= 1:
                return
        raise RuntimeError("the replica never caught up")


def start_replicated(data: Path) -> Iterator[ReplicatedRedis]:
    """A primary and its replica, linked and in sync; both stopped on exit."""
    port, replica_port = free_port(), free_port()
    # No 5 s wait for more replicas before the first full sync.
    primary = start_server(data / "primary", port, "--repl-diskless-sync-delay", "0")
    replica = start_server(data / "replica", replica_port)
    # Asked at runtime, a replica connects at once (from its config: at its next cron tick).
    with redis.Redis(host="127.0.0.1", port=replica_port) as client:
        client.replicaof("127.0.0.1", port)
    try:
        yield ReplicatedRedis(primary, replica, port)
    finally:
        replica.send_signal(signal.SIGCONT)
        for proc in (replica, primary):
            proc.terminate()
            proc.wait(10)


async def wait_linked(client: aioredis.Redis) -> None:
    """Until the primary's replica is online (past its first full sync: WAIT counts
    only online replicas)."""
    for _ in range(400):
        info = await client.info("replication")
        replica = info.get("slave0")
        if isinstance(replica, dict) and replica.get("state") == "online":
            return
        await asyncio.sleep(0.025)
    raise RuntimeError("the replica never linked")


# -- what the receiver must see ---------------------------------------------------------


def ids_with_two_bodies(receiver: Receiver) -> list[str]:
    bodies: dict[str, set[bytes]] = defaultdict(set)
    for r in receiver.received:
        bodies[r.id].add(r.body)
    return [i for i, b in bodies.items() if len(b) > 1]


def sequences_under_two_ids(receiver: Receiver) -> list[tuple[str, int, set[str]]]:
    ids: dict[tuple[str, int], set[str]] = defaultdict(set)
    for r in receiver.delivered:
        data = r.payload()["data"]
        if "call_id" in data and data.get("sequence") is not None:
            ids[(data["call_id"], data["sequence"])].add(r.id)
    return [(c, s, i) for (c, s), i in ids.items() if len(i) > 1]


def kept(receiver: Receiver) -> list[dict[str, Any]]:
    """What a receiver that deduplicates on `webhook-id` keeps: the first 2xx body of
    each id, in arrival order."""
    seen: set[str] = set()
    out = []
    for r in receiver.delivered:
        if r.id not in seen:
            seen.add(r.id)
            out.append(orjson.loads(r.body))
    return out
