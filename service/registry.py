"""The set of watched batches, shared by every replica through Redis.

Batches listed in config are registered at start-up; operators add and remove
more at runtime (admin API). Every replica reads the registry to know what to poll.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from service.config import BatchSettings
from service.constants import Keys
from service.redisconn import Redis


@dataclass(frozen=True, slots=True)
class Registration:
    batch_id: str
    backfill: bool | None
    source: str  # "config" or "api"
    added_ms: int


class BatchRegistry:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._key = keys.batches()

    async def register_config(self, batches: Iterable[BatchSettings]) -> None:
        """Add the config's batches; an existing registration is left as it is."""
        for b in batches:
            await self._redis.hsetnx(self._key, b.id, self._encode(b.id, b.backfill, "config"))

    async def add(self, batch_id: str, backfill: bool | None = None) -> bool:
        """Register a batch; False when it was registered already."""
        return bool(
            await self._redis.hsetnx(self._key, batch_id, self._encode(batch_id, backfill, "api"))
        )

    async def remove(self, batch_id: str) -> bool:
        return bool(await self._redis.hdel(self._key, batch_id))

    async def all(self) -> dict[str, Registration]:
        raw = await self._redis.hgetall(self._key)
        out: dict[str, Registration] = {}
        for k, v in raw.items():
            doc = orjson.loads(v)
            out[k.decode()] = Registration(
                batch_id=k.decode(),
                backfill=doc.get("backfill"),
                source=doc.get("source", "api"),
                added_ms=int(doc.get("added_ms", 0)),
            )
        return out

    @staticmethod
    def _encode(batch_id: str, backfill: bool | None, source: str) -> bytes:
        return orjson.dumps(
            {"backfill": backfill, "source": source, "added_ms": int(time.time() * 1000)}
        )
