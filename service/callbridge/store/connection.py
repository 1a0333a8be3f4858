"""Connecting to Redis, a Redis Cluster, or the embedded server.

redis-py types most commands as ``Awaitable[Any] | Any`` so that one signature
serves its sync and async clients; under ``mypy --strict`` every ``await`` of them
would need a cast. We name the client type ``Redis`` here, as ``Any``, and keep
the typed surface in our own store/queue classes instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callbridge.config import RedisSettings
from callbridge.errors import RedisUnavailableError

log = logging.getLogger(__name__)

Redis = Any

# Transient Redis failures (failover, restart, a dropped connection) are retried by
# the client itself for a few seconds before an error reaches our code. It must be
# the asyncio Retry: the sync one returns the coroutine unawaited, so nothing was
# ever retried. A retried script may have run already (the reply was lost): every
# script is idempotent for that reason (see store/lua/).
_RETRY = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=8)
# At start-up, one PING within this long and without those retries: an unreachable
# server, a refused password or an untrusted certificate is a configuration problem,
# reported at once (`check_reachable`); once running, the retries stay.
STARTUP_CHECK_S = 8.0


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


def connect(url: str, settings: RedisSettings, *, retries: bool = True) -> Redis:
    """A client for `url`: a cluster client when the settings ask for one (`retries`:
    the client retries transient failures itself, as a running bridge wants)."""
    common: dict[str, Any] = {
        "decode_responses": False,
        "health_check_interval": 15,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "retry": _RETRY if retries else Retry(NoBackoff(), 0),
    }
    if settings.use_cluster:
        cluster_url = url.replace("redis+cluster://", "redis://").replace(
            "rediss+cluster://", "rediss://"
        )
        common.pop("health_check_interval")
        return RedisCluster.from_url(cluster_url, **common)
    client = aioredis.Redis.from_url(
        url,
        retry_on_error=[RedisConnectionError, RedisTimeoutError] if retries else [],
        **common,
    )
    pool = client.connection_pool
    # Keeps the scheme's class (TCP, TLS or unix socket), with the C packer.
    pool.connection_class = type(
        pool.connection_class.__name__, (_HiredisPacking, pool.connection_class), {}
    )
    return client


async def check_reachable(
    url: str, settings: RedisSettings, timeout_s: float = STARTUP_CHECK_S
) -> None:
    """Whether Redis at `url` answers a PING now; `RedisUnavailableError` naming the
    cause and ``redis.url`` (never the password) when it does not."""
    client = connect(url, settings, retries=False)
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
    except Exception as exc:
        raise RedisUnavailableError(
            f"Redis at {_where(url)} (redis.url): {_cause(exc, timeout_s)}"
        ) from None
    finally:
        # Closing what may never have opened: the cause, if any, is above.
        with contextlib.suppress(Exception):
            await client.aclose()


def _where(url: str) -> str:
    """Where `url` points, without its userinfo (a password) or query."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _cause(exc: BaseException, timeout_s: float) -> str:
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"its TLS certificate is not signed by a CA we trust ({e.verify_message})"
        if isinstance(e, ssl.SSLError):
            return f"TLS failed ({e.reason or e})"
        if isinstance(e, AuthenticationError) or (
            isinstance(e, ResponseError) and str(e).split(" ", 1)[0] in ("WRONGPASS", "NOAUTH")
        ):
            return f"it refused the password ({e})"
    if any(isinstance(e, TimeoutError | RedisTimeoutError) for e in _chain(exc)):
        return f"no answer within {timeout_s:.0f}s (unreachable, or packets dropped)"
    if isinstance(exc, RedisConnectionError | OSError):
        return f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}"


async def persistence_problems(redis: Redis) -> list[str]:
    """What in the server's configuration may lose our writes; empty when nothing.

    Managed services often forbid CONFIG: then nothing can be checked and nothing
    is reported.
    """
    try:
        cfg = await redis.config_get("appendonly")
        cfg.update(await redis.config_get("save"))
        cfg.update(await redis.config_get("maxmemory-policy"))
    except ResponseError:
        # Refused (a managed service): unknown, not a problem. A Redis that cannot be
        # reached is no answer either way: that error goes to the caller.
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
