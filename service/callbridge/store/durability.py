"""Whether the Redis primary we write to may lose our writes: persistence off, or
eviction allowed. Checked at start and again whenever the primary changes (a
Sentinel failover promotes a replica whose configuration may differ)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import ResponseError

from callbridge.models.redis_target import RedisTarget
from callbridge.store.connection import PRIMARY_UNKNOWN, Redis, primary_address

log = logging.getLogger(__name__)


async def persistence_problems(redis: Redis, primary: str = "") -> list[str]:
    """What in the server's configuration may lose our writes; empty when nothing.

    `primary` (host:port) names the server in the problems. Managed services often
    forbid CONFIG, and a least-privileged ACL user may lack it: then nothing can be
    checked, a warning says so and nothing is reported.
    """
    where = f"Redis primary {primary}" if primary else "Redis"
    try:
        cfg = await redis.config_get("appendonly")
        cfg.update(await redis.config_get("save"))
        cfg.update(await redis.config_get("maxmemory-policy"))
    except ResponseError as exc:
        # Refused: unknown, not a problem. A Redis that cannot be reached is no
        # answer either way: that error goes to the caller.
        log.warning(
            "cannot read CONFIG of %s (%s); persistence settings not checked",
            where,
            str(exc).split(" ", 1)[0],
            extra={"action": "redis_config_refused"},
        )
        return []
    values = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in cfg.items()
    }
    problems = []
    if values.get("appendonly") != "yes" and not values.get("save"):
        problems.append(
            f"{where}: persistence is off (appendonly no, no save points): a Redis restart "
            "loses snapshots and queued deliveries"
        )
    policy = values.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        problems.append(
            f"{where}: maxmemory-policy is {policy}: keys may be evicted; use noeviction"
        )
    return problems


# How often the Sentinels are asked which primary we should write to.
_FOLLOW_EVERY_S = 2.0


class PrimaryWatch:
    """Which primary the client writes to, and whether it changed (a failover).

    redis-py's Sentinel client finds a new primary when the old one refuses a write
    (READONLY) or drops the connection; a read on a pooled connection to a demoted
    primary would still be answered, by a replica. Asking the Sentinels every few
    seconds (`changed`) closes idle connections to the old primary and names the new
    one, so its persistence is checked and logged."""

    def __init__(self, redis: Redis, target: RedisTarget) -> None:
        self._redis = redis
        self._target = target
        self.primary = ""  # host:port last checked

    @property
    def follows_failovers(self) -> bool:
        return self._target.kind == "sentinel"

    async def problems(self) -> list[str]:
        """The persistence problems of the primary we write to now (remembered)."""
        await self._redis.ping()  # connected: under Sentinel, the primary is known now
        self.primary = primary_address(self._redis, self._target)
        problems = await persistence_problems(self._redis, self.primary)
        if not problems:
            log.info("Redis primary %s checked", self.primary, extra={"action": "redis_checked"})
        return problems

    async def follow(
        self, stopping: asyncio.Event, on_change: Callable[[], Awaitable[None]]
    ) -> None:
        """Under Sentinel, until `stopping`: after a failover, `on_change` (the
        persistence check: a promoted replica's configuration may differ from the old
        primary's). The Sentinels are asked every `_FOLLOW_EVERY_S`."""
        while not stopping.is_set():
            try:
                if await self.changed():
                    await on_change()
            except Exception as exc:
                log.warning("Sentinels: %r", exc, extra={"action": "sentinel_failed"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), _FOLLOW_EVERY_S)

    async def changed(self) -> bool:
        """Whether the Sentinels name another primary than the one last checked."""
        if not self.follows_failovers:
            return False
        # Asks the Sentinels; on a change, idle connections to the old primary close.
        await self._redis.connection_pool.get_master_address()
        now = primary_address(self._redis, self._target)
        if now in (self.primary, PRIMARY_UNKNOWN):
            return False
        log.warning(
            "Redis primary is now %s (was %s): a failover",
            now,
            self.primary,
            extra={"action": "redis_primary_changed"},
        )
        return True
