"""Who polls what: batch leases and replica heartbeats.

A replica polls a batch only while it holds the batch's lease, a key with a TTL
holding the replica's token (``SET NX PX``). Renewal and release check the token,
so a replica can only extend or drop its own lease; the commit script checks it
too (fencing). Heartbeats let each replica size its fair share of the batches.
"""

from __future__ import annotations

from callbridge.store.connection import Redis
from callbridge.store.keys import Keys
from callbridge.store.scripts import register


class LeaseStore:
    """Batch leases and the live-replica count, in Redis."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._renew = register(redis, "renew_lease")
        self._release = register(redis, "release_lease")

    # -- leases ----------------------------------------------------------------

    async def acquire(self, batch_id: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._redis.set(self._keys.lease(batch_id), token, nx=True, px=ttl_ms))

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

    async def heartbeat(self, replica_id: str, now_ms: int, ttl_ms: int) -> None:
        key = self._keys.replicas()
        await self._redis.zadd(key, {replica_id: now_ms})
        # Replicas silent for ten lease periods are gone for good.
        await self._redis.zremrangebyscore(key, "-inf", now_ms - 10 * ttl_ms)

    async def live_replicas(self, now_ms: int, ttl_ms: int) -> int:
        return int(await self._redis.zcount(self._keys.replicas(), now_ms - ttl_ms, "+inf"))
