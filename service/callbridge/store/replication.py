"""Whether a batch's commits have reached the replicas, before their events go on.

Redis replicates asynchronously: a primary that dies may take its last writes with it,
and the replica promoted in its place holds an older, consistent prefix of them. A
commit whose events were delivered and then lost that way is diffed again, and what
the receiver hears about may change (README, "What a failover can and cannot lose").
With `redis.min_replicas_to_ack: N`, the relay hands a batch's events on only once
`WAIT N` says N replicas hold every write made before it — the commits included.

`WAIT` counts the writes of the connection it is sent on, so it goes in one pipeline
behind a write of its own (a key in the batch's slot), made after the commits it must
cover: a replica that acknowledged that write holds everything before it.
"""

from __future__ import annotations

from callbridge.config import RedisSettings
from callbridge.store.connection import Redis
from callbridge.store.keys import Keys

# The marker only needs to outlive its WAIT.
_MARKER_TTL_MS = 60_000


class ReplicaAcks:
    """Asks the primary how many replicas hold every write so far (`WAIT`)."""

    def __init__(self, redis: Redis, keys: Keys, *, replicas: int, timeout_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self.replicas = replicas
        self._timeout_ms = timeout_ms

    @classmethod
    def of(cls, redis: Redis, keys: Keys, settings: RedisSettings) -> ReplicaAcks | None:
        """What holds events back until replicas have their commits (None: nothing)."""
        if not settings.min_replicas_to_ack:
            return None
        timeout_ms = max(1, int(settings.replica_ack_timeout_seconds * 1000))
        return cls(redis, keys, replicas=settings.min_replicas_to_ack, timeout_ms=timeout_ms)

    async def wait(self, batch_id: str) -> int:
        """How many replicas hold the writes made before this call (at least `replicas`
        once they all did; fewer when `timeout_ms` passed first)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._keys.acked(batch_id), "1", px=_MARKER_TTL_MS)
            pipe.execute_command("WAIT", self.replicas, self._timeout_ms)
            _, acks = await pipe.execute()
        return int(acks)
