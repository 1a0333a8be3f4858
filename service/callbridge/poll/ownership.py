"""Which batches this replica polls: their leases, taken, renewed and handed back.

A lease is a Redis key with a TTL holding the owner's token (`store.leases`); every
commit is fenced by it. Taking or losing one drops what the replica kept of the batch
(`BatchCache.drop_cache`): a new owner starts from what Redis holds.
"""

from __future__ import annotations

import contextlib
import logging
import uuid

from callbridge.metrics import Metrics
from callbridge.poll.batch_cache import BatchCache
from callbridge.store.leases import LeaseStore

log = logging.getLogger(__name__)


class Ownership:
    """Takes, renews and hands back this replica's batch leases."""

    def __init__(self, leases: LeaseStore, metrics: Metrics, *, replica_id: str, ttl_ms: int):
        self._leases = leases
        self._metrics = metrics
        self._replica_id = replica_id
        self._ttl_ms = ttl_ms

    async def hold(self, rt: BatchCache) -> bool:
        """Whether this replica holds `rt`'s lease for one more cycle: renewed, or
        taken (a fresh token, the cache dropped) when nobody holds it."""
        if rt.token is not None:
            if await self._leases.renew(rt.batch_id, rt.token, self._ttl_ms):
                return True
            log.warning(
                "lease on batch %s expired; reloading it",
                rt.batch_id,
                extra={"action": "lease_lost", "batch_id": rt.batch_id},
            )
            rt.token = None
            rt.drop_cache()
        token = f"{self._replica_id}:{uuid.uuid4().hex[:12]}"
        if await self._leases.acquire(rt.batch_id, token, self._ttl_ms):
            rt.token = token
            rt.drop_cache()
            log.info(
                "took batch %s",
                rt.batch_id,
                extra={"action": "lease_acquired", "batch_id": rt.batch_id},
            )
            return True
        return False

    async def release(self, rt: BatchCache) -> None:
        """Hand a lease back so another replica can take it at once, and drop the cache.

        Best effort: a lease we fail to delete still expires after its TTL.
        """
        if rt.token is not None:
            with contextlib.suppress(Exception):
                await self._leases.release(rt.batch_id, rt.token)
        rt.token = None
        rt.drop_cache()
        # The new owner exports the batch's series; ours would go stale.
        self._metrics.forget_batch(rt.batch_id)
