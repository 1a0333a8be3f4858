"""Keeps Redis bounded over months: what no configuration names any more goes.

A subscription removed from the config (or renamed) leaves its queue, records and
dead letters behind. Every replica records, in one shared hash, when its config
last named each subscription; a subscription no replica has named for
`delivery.orphan_retention_seconds` is deleted with all its keys. The retention
covers rolling config changes (replicas with the old config still name it) and
leaves time to inspect or replay its dead letters through a config that still
lists it.

Batches no replica polls any more (retired, or removed by an operator) keep a
tombstone in the registry; their state gets an expiry when they stop. A replica
killed between the tombstone and the expiry left keys that would stay for good, and
nobody polls such a batch to try again: each run gives the keys of every tombstone
that have none the expiry they should have had (`retired_retention_seconds` after
the batch stopped).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from callbridge.config import Settings
from callbridge.metrics import Metrics
from callbridge.store.connection import Redis
from callbridge.store.keys import Keys
from callbridge.store.registry import BatchRegistry
from callbridge.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)


class Janitor:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        keys: Keys,
        metrics: Metrics,
        *,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._names = [s.name for s in settings.subscriptions]
        self._retention_ms = int(settings.delivery.orphan_retention_seconds * 1000)
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._wall_ms = wall_ms
        self._batch_retention_ms = int(settings.poller.retired_retention_seconds * 1000)
        self._registry = BatchRegistry(redis, keys)
        self._store = SnapshotStore(redis, keys)

    async def run_once(self) -> list[str]:
        """Mark this config's subscriptions as named now; delete long-orphaned ones;
        let the state of stopped batches expire (`expire_stopped_batches`).

        Returns the subscription names deleted.
        """
        await self.expire_stopped_batches()
        now = self._wall_ms()
        key = self._keys.subscriptions()
        if self._names:
            await self._redis.hset(key, mapping=dict.fromkeys(self._names, now))
        seen = {k.decode(): int(v) for k, v in (await self._redis.hgetall(key)).items()}
        orphans = {n: ms for n, ms in seen.items() if n not in self._names}
        deleted = []
        for name, last_seen in orphans.items():
            if now - last_seen < self._retention_ms:
                continue
            removed = await self._delete_keys(name)
            await self._redis.hdel(key, name)
            deleted.append(name)
            log.warning(
                "subscription %s left the config %.1f days ago: deleted its %d keys",
                name,
                (now - last_seen) / 86_400_000,
                removed,
                extra={"action": "orphan_deleted", "subscription": name},
            )
        self._metrics.orphaned_subscriptions.set(len(orphans) - len(deleted))
        return deleted

    async def expire_stopped_batches(self) -> int:
        """Give the keys of retired and removed batches that have no expiry the one
        they should have had; how many keys had none."""
        now = self._wall_ms()
        fixed = 0
        for batch_id, reg in (await self._registry.all()).items():
            if not reg.retired:
                continue
            # A tombstone without its time (none should lack it): the whole retention.
            left_ms = (reg.retired_ms or now) + self._batch_retention_ms - now
            n = await self._store.expire_unset(batch_id, left_ms)
            if n:
                fixed += n
                log.warning(
                    "batch %s stopped without its state expiring (a crash in between): "
                    "%d keys now expire in %.0fs",
                    batch_id,
                    n,
                    max(0, left_ms) / 1000,
                    extra={"action": "batch_expiry_restored", "batch_id": batch_id},
                )
        return fixed

    async def _delete_keys(self, name: str) -> int:
        batch: list[bytes] = []
        removed = 0
        async for k in self._redis.scan_iter(
            match=self._keys.subscription_pattern(name), count=1000
        ):
            batch.append(k)
            if len(batch) >= 500:
                removed += int(await self._redis.unlink(*batch))
                batch = []
        if batch:
            removed += int(await self._redis.unlink(*batch))
        return removed
