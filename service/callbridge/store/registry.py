"""The set of watched batches, shared by every replica through Redis.

Batches listed in config are registered at start-up; operators add and remove
more at runtime (admin API). Every replica reads the registry to know what to poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from callbridge.config import BatchSettings
from callbridge.store.connection import Redis
from callbridge.store.keys import Keys


@dataclass(frozen=True, slots=True)
class Registration:
    batch_id: str
    backfill: bool | None
    source: str  # "config" or "api"
    added_ms: int
    # Retired batches stay registered as tombstones: a restart must not register a
    # config batch again after its state expired (it would be "seen" afresh).
    retired: bool = False
    retired_ms: int = 0
    # Removed by an operator (DELETE): a tombstone too, so that whatever a crash left
    # of its state is still found and let expire (`Janitor`); a config batch's is
    # registered again at start, as the config still lists it.
    removed: bool = False


class BatchRegistry:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._key = keys.batches()

    async def register_config(self, batches: Iterable[BatchSettings]) -> None:
        """Add the config's batches; an existing registration is left as it is, but
        for a removed one (the config still lists it: watched again)."""
        for b in batches:
            entry = self._encode(b.id, b.backfill, "config")
            if not await self._redis.hsetnx(self._key, b.id, entry):
                current = await self.get(b.id)
                if current is not None and current.removed:
                    await self._redis.hset(self._key, b.id, entry)

    async def add(self, batch_id: str, backfill: bool | None = None) -> bool:
        """Register a batch (or watch a retired one again); False when already watched."""
        entry = self._encode(batch_id, backfill, "api")
        if await self._redis.hsetnx(self._key, batch_id, entry):
            return True
        current = await self.get(batch_id)
        if current is not None and current.retired:
            # A config batch watched again stays one: its tombstone is never pruned, or
            # a restart would watch it afresh once its state expired (all re-emitted).
            entry = self._encode(batch_id, backfill, current.source)
            await self._redis.hset(self._key, batch_id, entry)
            return True
        return False

    async def retire(self, batch_id: str, *, removed: bool = False) -> bool:
        """Mark a batch as no longer polled, keeping it registered as a tombstone
        (`removed`: by an operator); whether it was registered."""
        current = await self.get(batch_id)
        if current is None:
            return False
        doc = {
            "backfill": current.backfill,
            "source": current.source,
            "added_ms": current.added_ms,
            "retired": True,
            "retired_ms": int(time.time() * 1000),
            "removed": removed or current.removed,
        }
        await self._redis.hset(self._key, batch_id, orjson.dumps(doc))
        return True

    async def prune(self, older_than_ms: int) -> int:
        """Drop tombstones of batches added through the API or removed, retired long ago.

        Their state has expired by then. Tombstones of config batches that retired
        stay (as many as the config lists): without them a restart would watch the
        batch afresh.
        """
        cutoff = int(time.time() * 1000) - older_than_ms
        gone = [
            b
            for b, reg in (await self.all()).items()
            if reg.retired and (reg.source == "api" or reg.removed) and 0 < reg.retired_ms < cutoff
        ]
        if gone:
            await self._redis.hdel(self._key, *gone)
        return len(gone)

    async def get(self, batch_id: str) -> Registration | None:
        raw = await self._redis.hget(self._key, batch_id)
        return self._decode(batch_id, raw) if raw else None

    async def remove(self, batch_id: str) -> bool:
        """Stop watching a batch (an operator's DELETE): a tombstone marked removed;
        whether it was registered (and not removed already)."""
        current = await self.get(batch_id)
        if current is None or current.removed:
            return False
        return await self.retire(batch_id, removed=True)

    async def all(self) -> dict[str, Registration]:
        raw = await self._redis.hgetall(self._key)
        out: dict[str, Registration] = {}
        for k, v in raw.items():
            out[k.decode()] = self._decode(k.decode(), v)
        return out

    @staticmethod
    def _decode(batch_id: str, raw: bytes) -> Registration:
        doc = orjson.loads(raw)
        return Registration(
            batch_id=batch_id,
            backfill=doc.get("backfill"),
            source=doc.get("source", "api"),
            added_ms=int(doc.get("added_ms", 0)),
            retired=bool(doc.get("retired", False)),
            retired_ms=int(doc.get("retired_ms", 0)),
            removed=bool(doc.get("removed", False)),
        )

    @staticmethod
    def _encode(batch_id: str, backfill: bool | None, source: str) -> bytes:
        return orjson.dumps(
            {"backfill": backfill, "source": source, "added_ms": int(time.time() * 1000)}
        )
