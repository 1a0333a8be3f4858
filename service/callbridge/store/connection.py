"""Connecting to Redis: one server, a Redis Cluster, a primary behind Sentinels (it
follows failovers), over TLS (mutual TLS too) and as an ACL user; or the embedded server.

redis-py types most commands as ``Awaitable[Any] | Any`` so that one signature
serves its sync and async clients; under ``mypy --strict`` every ``await`` of them
would need a cast. We name the client type ``Redis`` here, as ``Any``, and keep
the typed surface in our own store/queue classes instead.

What is checked before the bridge starts (reachable, trusted, permitted) is in
`store.preflight`; what may lose writes (persistence, eviction) in `store.durability`.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callbridge.config import RedisSettings, RedisTlsSettings
from callbridge.models.redis_target import RedisTarget, parse_redis_url

Redis = Any

# Transient Redis failures (failover, restart, a dropped connection) are retried by
# the client itself before an error reaches our code: 8 retries with backoff, each
# reconnecting (and under Sentinel, asking the Sentinels for the primary again), so a
# failover that Sentinel settles within ~30 s is a slow command, not a failed one. It
# must be the asyncio Retry: the sync one returns the coroutine unawaited, so nothing
# was ever retried. A retried script may have run already (the reply was lost): every
# script is idempotent for that reason (see store/lua/).
_RETRIES = 8
_BACKOFF_CAP_S = 2.0
# READONLY: a primary demoted to a replica (a failover) still holds our connection.
# Under Sentinel redis-py turns it into a ConnectionError and asks the Sentinels
# again; behind one address (a managed service's DNS name) the retry reconnects,
# which resolves the name again. A write refused with READONLY ran nothing.
_RETRIED = [RedisConnectionError, RedisTimeoutError, ReadOnlyError]
_SENTINEL_TIMEOUT_S = 5.0
# Under Sentinel, before the first connection asked the Sentinels.
PRIMARY_UNKNOWN = "(primary not known yet)"


def _retry(retries: bool) -> Retry:
    # One per client: redis-py adds `retry_on_error` to the object it is given.
    if not retries:
        return Retry(NoBackoff(), 0)
    return Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), retries=_RETRIES)


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


class _AsksSentinel:
    """Reconnects to the primary the Sentinels name now, not the address it had.

    redis-py (8.2) reconnects a Sentinel-managed connection inside a command's retry
    through ``connect_check_health``, which its Sentinel connection does not override:
    after a failover every retry went back to the demoted primary (READONLY again,
    or refused if it died) until the retries ran out (`tests/integration/test_sentinel`).
    """

    connection_pool: Any
    host: str
    port: int

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if not self.is_connected and self.connection_pool.is_master:  # type: ignore[attr-defined]
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health, retry_socket_connect)  # type: ignore[misc]


class _SentinelPrimary(aioredis.Redis):
    """The primary's client; closing it closes the Sentinels' clients too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.connection_pool.sentinel_manager.aclose()  # type: ignore[attr-defined]


def tls_options(tls: RedisTlsSettings) -> dict[str, Any]:
    """redis-py's ssl_* arguments for `tls` (used only with a TLS scheme)."""
    options: dict[str, Any] = {
        "ssl_cert_reqs": "required" if tls.verify else "none",
        "ssl_check_hostname": tls.verify,
    }
    if tls.ca_file:
        options["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file:
        options["ssl_certfile"] = tls.cert_file
        options["ssl_keyfile"] = tls.key_file
    return options


def target_of(url: str, settings: RedisSettings) -> RedisTarget:
    """`url` (the settings' own, or the embedded server's) with the settings' credentials."""
    if settings.url == url and settings.target is not None:
        return settings.target
    return parse_redis_url(url)


def connect(url: str, settings: RedisSettings, *, retries: bool = True) -> Redis:
    """A client for `url`: one server, a Cluster or the primary Sentinels name
    (`retries`: the client retries transient failures itself, as a running bridge
    wants; off for the start-up checks, which report at once)."""
    target = target_of(url, settings)
    common: dict[str, Any] = {
        "decode_responses": False,
        "health_check_interval": 15,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "retry": _retry(retries),
        "username": target.username,
        "password": target.password,
    }
    if target.tls:
        common.update(tls_options(settings.tls))
    if target.kind == "sentinel":
        return _sentinel_primary(target, settings, common, retries)
    if settings.use_cluster:
        cluster_url = url.replace("redis+cluster://", "redis://").replace(
            "rediss+cluster://", "rediss://"
        )
        common.pop("health_check_interval")
        return RedisCluster.from_url(cluster_url, **common)
    client = aioredis.Redis.from_url(
        url, retry_on_error=list(_RETRIED) if retries else [], **common
    )
    _pack_with_hiredis(client)
    return client


def _sentinel_primary(
    target: RedisTarget, settings: RedisSettings, common: dict[str, Any], retries: bool
) -> Redis:
    sentinel_options: dict[str, Any] = {
        "socket_connect_timeout": _SENTINEL_TIMEOUT_S,
        "socket_timeout": _SENTINEL_TIMEOUT_S,
        "password": (
            settings.sentinel_password.get_secret_value() if settings.sentinel_password else None
        ),
    }
    if target.tls:
        # TLS to the data nodes means TLS to the Sentinels too (one CA, one client
        # certificate), as charts that enable TLS set both up.
        sentinel_options.update(ssl=True, **tls_options(settings.tls))
    sentinel = Sentinel(
        list(target.hosts),
        sentinel_kwargs=sentinel_options,
        db=target.db,
        ssl=target.tls,
        retry_on_error=list(_RETRIED) if retries else [],
        **common,
    )
    assert target.service_name is not None  # a sentinel URL names one (parse_redis_url)
    client = sentinel.master_for(target.service_name, redis_class=_SentinelPrimary)
    _pack_with_hiredis(client, _AsksSentinel)
    return client


def _pack_with_hiredis(client: aioredis.Redis, *mixins: type) -> None:
    pool = client.connection_pool
    # Keeps the scheme's class (TCP, TLS, unix socket, Sentinel-managed), with the C packer.
    pool.connection_class = type(
        pool.connection_class.__name__, (*mixins, _HiredisPacking, pool.connection_class), {}
    )


def primary_address(redis: Redis, target: RedisTarget) -> str:
    """host:port of the primary `redis` writes to now (under Sentinel: the last one the
    Sentinels named), for messages; no I/O."""
    if target.kind == "sentinel":
        address = redis.connection_pool.master_address
        return f"{address[0]}:{address[1]}" if address else PRIMARY_UNKNOWN
    if target.kind == "unix":
        return str(target.socket_path)
    host, port = target.hosts[0]
    return f"{host}:{port}"
