"""Connecting to Redis, a Redis Cluster, or the embedded server.

redis-py types most commands as ``Awaitable[Any] | Any`` so that one signature
serves its sync and async clients; under ``mypy --strict`` every ``await`` of them
would need a cast. We name the client type ``Redis`` here, as ``Any``, and keep
the typed surface in our own store/queue classes instead.
"""

from __future__ import annotations

import logging
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callbridge.config import RedisSettings

log = logging.getLogger(__name__)

Redis = Any

# Transient Redis failures (failover, restart, a dropped connection) are retried by
# the client itself for a few seconds before an error reaches our code. It must be
# the asyncio Retry: the sync one returns the coroutine unawaited, so nothing was
# ever retried. A retried script may have run already (the reply was lost): every
# script is idempotent for that reason (see store/lua/).
_RETRY = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8)


class _HiredisPacking:
    """Packs commands with hiredis's C packer instead of redis-py's Python one.

    redis-py's asyncio connections pack every argument in Python (``pack_command``
    and ``Encoder.encode`` were the top own-time functions of a poll cycle and of a
    flood of deliveries: the commit, enqueue and completion scripts take thousands
    of arguments). The bytes on the wire are the same; anything hiredis does not
    take (a bool, None) goes the Python way and fails there as before.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        # "CONFIG GET" and the like go out as two words (as redis-py does).
        if (isinstance(name, str) and " " in name) or (isinstance(name, bytes) and b" " in name):
            args = (*name.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            packed: list[bytes] = super().pack_command(*args)  # type: ignore[misc]
            return packed


def connect(url: str, settings: RedisSettings) -> Redis:
    """A client for `url`: a cluster client when the settings ask for one."""
    common: dict[str, Any] = {
        "decode_responses": False,
        "health_check_interval": 15,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "retry": _RETRY,
    }
    if settings.use_cluster:
        cluster_url = url.replace("redis+cluster://", "redis://").replace(
            "rediss+cluster://", "rediss://"
        )
        common.pop("health_check_interval")
        return RedisCluster.from_url(cluster_url, **common)
    client = aioredis.Redis.from_url(
        url,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **common,
    )
    pool = client.connection_pool
    # Keeps the scheme's class (TCP, TLS or unix socket), with the C packer.
    pool.connection_class = type(
        pool.connection_class.__name__, (_HiredisPacking, pool.connection_class), {}
    )
    return client


async def persistence_problems(redis: Redis) -> list[str]:
    """What in the server's configuration may lose our writes; empty when nothing.

    Managed services often forbid CONFIG: then nothing can be checked and nothing
    is reported.
    """
    try:
        cfg = await redis.config_get("appendonly")
        cfg.update(await redis.config_get("save"))
        cfg.update(await redis.config_get("maxmemory-policy"))
    except Exception:
        log.info("cannot read Redis CONFIG; persistence settings not checked")
        return []
    values = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in cfg.items()
    }
    problems = []
    if values.get("appendonly") != "yes" and not values.get("save"):
        problems.append(
            "Redis persistence is off (appendonly no, no save points): a Redis restart "
            "loses snapshots and queued deliveries"
        )
    policy = values.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        problems.append(f"Redis maxmemory-policy is {policy}: keys may be evicted; use noeviction")
    return problems
