"""Who polls what: batch leases and replica heartbeats.

A replica polls a batch only while it holds the batch's lease, a key with a TTL
holding the replica's token (``SET NX PX``). Renewal and release check the token,
so a replica can only extend or drop its own lease; the commit script checks it
too (fencing). Heartbeats let each replica size its fair share of the batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from callbridge.errors import LeaseLostError
from callbridge.store.connection import Redis
from callbridge.store.keys import Keys
from callbridge.store.scripts import register

log = logging.getLogger(__name__)


class LeaseStore:
    """Batch leases and the live-replica count, in Redis."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._acquire = register(redis, "acquire_lease")
        self._renew = register(redis, "renew_lease")
        self._release = register(redis, "release_lease")
        self._heartbeat = register(redis, "heartbeat")
        self._live = register(redis, "live_replicas")

    # -- leases ----------------------------------------------------------------

    async def acquire(self, batch_id: str, token: str, ttl_ms: int) -> bool:
        """Take the lease if it is free or held by this replica's previous process.

        Tokens are ``<replica id>:<per-process part>``: a lease whose token has our
        replica id but another process part was left by our own predecessor, killed
        before it could release it; waiting for its TTL would blind the batch.
        """
        replica = token.rpartition(":")[0] + ":"
        return bool(
            await self._acquire(keys=[self._keys.lease(batch_id)], args=[token, ttl_ms, replica])
        )

    async def renew(self, batch_id: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._renew(keys=[self._keys.lease(batch_id)], args=[token, ttl_ms]))

    async def release(self, batch_id: str, token: str) -> None:
        await self._release(keys=[self._keys.lease(batch_id)], args=[token])

    async def owner(self, batch_id: str) -> str | None:
        raw = await self._redis.get(self._keys.lease(batch_id))
        return raw.decode() if raw else None

    async def owners(self, batch_ids: list[str]) -> list[str | None]:
        """`owner` of many batches in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.get(self._keys.lease(batch_id))
            return [raw.decode() if raw else None for raw in await pipe.execute()]

    # -- replicas ----------------------------------------------------------------

    async def heartbeat(self, replica_id: str, ttl_ms: int) -> int:
        """Say this replica is alive; returns how many replicas are (itself included).

        Times are the Redis server's: a replica with a fast clock must not count as
        alive long after it died.
        """
        return int(await self._heartbeat(keys=[self._keys.replicas()], args=[replica_id, ttl_ms]))

    async def leave(self, replica_id: str) -> None:
        """Stop counting as alive (shutting down, or unable to poll): others take over."""
        await self._redis.zrem(self._keys.replicas(), replica_id)

    async def live_replicas(self, ttl_ms: int) -> int:
        return int(await self._live(keys=[self._keys.replicas()], args=[ttl_ms]))


# How long leaving a LeaseKeeper waits for its renewal task to end.
_STOP_WAIT_S = 1.0


class LeaseKeeper:
    """Keeps a batch lease alive while a long cycle runs (``async with``).

    A scan under a small request budget can take longer than the lease TTL; the
    keeper renews the lease every third of it, so a live replica's cycle is never
    fenced. `check` raises `LeaseLostError` once a renewal found the lease gone
    (another replica took the batch): the cycle stops instead of scanning for
    nothing, and the commit script would refuse its write anyway.
    """

    def __init__(self, leases: LeaseStore, batch_id: str, token: str, ttl_ms: int) -> None:
        self._leases = leases
        self._batch_id = batch_id
        self._token = token
        self._ttl_ms = ttl_ms
        self._lost = False
        self._task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> LeaseKeeper:
        self._task = asyncio.create_task(self._renew_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Asked to stop, then cancelled, then waited for a little only: a Redis call
        # may swallow the cancellation (seen with redis-py 8.2 on Python 3.11: the
        # task slept on as if nothing happened, and a cycle awaiting it never ended,
        # its batch never polled again). The loop sees `_stopped` at its next turn.
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=_STOP_WAIT_S)

    def check(self) -> None:
        if self._lost:
            raise LeaseLostError(f"lease on batch {self._batch_id} lost during the scan")

    async def _renew_forever(self) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), self._ttl_ms / 3000)
            if self._stopped.is_set():
                return
            try:
                if not await self._leases.renew(self._batch_id, self._token, self._ttl_ms):
                    self._lost = True
                    return
            except Exception:
                # Redis unreachable for a moment: the lease may well still be ours;
                # the next renewal (or the commit's fencing) decides.
                log.warning(
                    "could not renew the lease on batch %s",
                    self._batch_id,
                    exc_info=True,
                    extra={"action": "lease_renew_failed", "batch_id": self._batch_id},
                )
