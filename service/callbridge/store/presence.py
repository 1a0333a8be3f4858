"""One process per replica id: a per-process beat that tells two apart.

Replicas are told apart by ``server.replica_id``; a restarted replica takes its
predecessor's leases over at once (`LeaseStore.acquire`). Two *live* processes under
one id would steal each other's leases every cycle. Each process beats under its id
with a nonce of its own (`presence.lua`): at start it waits until any other process
under its id has either beaten again (alive: this one refuses to start,
`DuplicateReplicaError`) or been silent for `WINDOW_MS` (a predecessor killed a moment
ago: this one takes over). While running, a beat that finds another live process
under its id started earlier tells this one to stop; the earlier one carries on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from callbridge.errors import DuplicateReplicaError
from callbridge.store.connection import Redis
from callbridge.store.keys import Keys
from callbridge.store.scripts import register

# A process beats this often; it counts as live while its last beat is this recent.
# The window leaves a busy event loop 1.5 s of slack, and delays a restart after a
# SIGKILL by at most that long (less the time the new process takes to start).
BEAT_EVERY_S = 0.5
WINDOW_MS = 2000


@dataclass(frozen=True, slots=True)
class Beat:
    """What one beat found (server clock, ms)."""

    conflict: bool
    other_first_ms: int
    own_first_ms: int
    other_last_ms: int
    now_ms: int

    @property
    def second(self) -> bool:
        """Another live process under this id started before this one did."""
        return self.conflict and self.other_first_ms <= self.own_first_ms


class Presence:
    """This process's beat under its replica id."""

    def __init__(self, redis: Redis, keys: Keys, replica_id: str) -> None:
        self._key = keys.replica_processes()
        self.replica_id = replica_id
        self._nonce = uuid.uuid4().hex[:16]
        self._beat = register(redis, "presence")
        self._redis = redis

    async def beat(self) -> Beat:
        reply = await self._beat(keys=[self._key], args=[self.replica_id, self._nonce, WINDOW_MS])
        conflict, other_first, own_first, other_last, now = (int(v) for v in reply)
        return Beat(bool(conflict), other_first, own_first, other_last, now)

    async def claim(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Start beating; raise `DuplicateReplicaError` when another live process
        already runs under this replica id (waits at most `WINDOW_MS` to tell)."""
        beat = await self.beat()
        while not beat.conflict and beat.other_last_ms + WINDOW_MS > beat.now_ms:
            # Another process beat lately: alive, or killed a moment ago.
            await sleep(BEAT_EVERY_S)
            beat = await self.beat()
        if beat.second:
            raise self.duplicate()

    def duplicate(self) -> DuplicateReplicaError:
        return DuplicateReplicaError(
            f"another live process runs as replica {self.replica_id!r} (server.replica_id): "
            "two processes under one id take each other's batch leases every cycle; give "
            "each replica its own server.replica_id, or stop the other process first"
        )

    async def leave(self) -> None:
        """Stop beating (a graceful stop): a successor under this id starts at once."""
        await self._redis.hdel(self._key, f"{self.replica_id}|{self._nonce}")
