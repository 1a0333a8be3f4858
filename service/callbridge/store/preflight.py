"""Before the bridge starts: can it use the Redis its settings name, and if not, why.

A configuration problem (nothing listening, no Sentinel that knows the service, a
refused password, a certificate our CA does not sign or that has expired, a user
lacking a command) is reported in one line naming the setting to fix, within
seconds, and `callbridge run` exits 3: never after minutes of hidden retries, never a
loop that looks healthy. Every check here runs without the client's retries; once
running, transient errors are retried as before (`store.connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import Iterator
from typing import Any

from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callbridge.config import RedisSettings
from callbridge.errors import RedisUnavailableError
from callbridge.models.redis_target import RedisTarget
from callbridge.store.connection import Redis, connect, target_of
from callbridge.store.permissions import OPTIONAL, REQUIRED, command_name, probe_args

log = logging.getLogger(__name__)

# One answer within this long; an unreachable server (packets dropped) is then named.
STARTUP_CHECK_S = 8.0
# TLS alerts a server sends when it refuses our client certificate (mutual TLS).
_CLIENT_CERT_ALERTS = ("CERTIFICATE_REQUIRED", "UNKNOWN_CA", "BAD_CERTIFICATE", "EXPIRED")


async def check_reachable(
    url: str, settings: RedisSettings, timeout_s: float = STARTUP_CHECK_S
) -> None:
    """Whether Redis at `url` answers now and this user may send every command the
    bridge sends; `RedisUnavailableError` naming the cause and the setting (never a
    password) when not. A refused optional command is a warning."""
    target = target_of(url, settings)
    if target.tls and (unreadable := settings.tls.unreadable()):
        raise RedisUnavailableError(f"Redis at {target.where()}: {'; '.join(unreadable)}")
    client = connect(url, settings, retries=False)
    try:
        async with asyncio.timeout(timeout_s):
            await client.ping()
            refused = await _refused_commands(client, target, settings.key_prefix)
    except RedisUnavailableError:
        raise
    except Exception as exc:
        raise RedisUnavailableError(
            f"Redis at {target.where()} (redis.url): {_cause(exc, timeout_s, settings)}"
        ) from None
    finally:
        # Closing what may never have opened: the cause, if any, is above.
        with contextlib.suppress(Exception):
            await client.aclose()
    needed = list(dict.fromkeys(name for name in refused if name not in _OPTIONAL_NAMES))
    user = target.username or "default"
    if needed:
        keys = [n for n in needed if n.startswith("keys ")]
        what = ", ".join(n for n in needed if n not in keys)
        what = " and ".join(p for p in (what and f"run {what}", keys and f"use {keys[0]}") if p)
        raise RedisUnavailableError(
            f"Redis at {target.where()} (redis.url): user {user!r} may not {what} "
            "(NOPERM): add them to its ACL rule (README: ACL users)"
        )
    for name in refused:
        log.warning(
            "Redis user %r may not run %s: %s",
            user,
            name,
            _WITHOUT.get(name, "it is not used"),
            extra={"action": "redis_command_refused"},
        )


_OPTIONAL_NAMES = {command_name(c) for c in OPTIONAL}
_WITHOUT = {
    "CONFIG GET": "persistence and eviction settings are not checked",
    "CLIENT SETINFO": "the client library is not named in CLIENT LIST",
}


async def _refused_commands(client: Redis, target: RedisTarget, key_prefix: str) -> list[str]:
    """The commands (REQUIRED, then OPTIONAL) Redis refuses this user with NOPERM.

    Each is queued in a MULTI that is then discarded: Redis checks a command's ACL
    (and its keys') when it queues it, and nothing queued ever runs."""
    if target.kind == "cluster":
        await client.initialize()
        node = client.get_default_node()
        conn = node.acquire_connection()
        release = node.release
    else:
        conn = await client.connection_pool.get_connection()
        release = client.connection_pool.release
    try:
        await conn.connect()
        commands = [probe_args(c, key_prefix) for c in (*REQUIRED, *OPTIONAL)]
        await conn.send_command("MULTI")
        if _nopermission(await _reply(conn)):
            # Without MULTI the probe cannot run safely; say so rather than guess.
            return ["MULTI"]
        await conn.send_packed_command(conn.pack_commands([*commands, ("DISCARD",)]))
        refused = []
        for args in commands:
            reply = await _reply(conn)
            if _nopermission(reply):
                # A key outside the user's key patterns: the rule's ~prefix:* is wrong.
                keys = "access a key" in str(reply)
                refused.append(f"keys {key_prefix}:*" if keys else command_name(args))
        if _nopermission(await _reply(conn)):
            refused.append("DISCARD")
        return refused
    finally:
        # Never reused: a refused DISCARD leaves it inside the MULTI.
        await conn.disconnect()
        released = release(conn)  # a Cluster node's release is not a coroutine
        if inspect.isawaitable(released):
            await released


async def _reply(conn: Any) -> Any:
    """One reply; an error reply is returned, not raised (the probe reads them all)."""
    try:
        return await conn.read_response()
    except ResponseError as exc:
        return exc


def _nopermission(reply: Any) -> bool:
    # A command or a key the user may not touch; any other error (WRONGTYPE, MOVED,
    # CROSSSLOT) means Redis accepted to consider it, which is all the probe asks.
    return isinstance(reply, NoPermissionError)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _cause(exc: BaseException, timeout_s: float, settings: RedisSettings) -> str:
    ca = settings.tls.ca_file or "the system's CAs"
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return (
                f"its TLS certificate is not trusted ({e.verify_message}): check "
                f"redis.tls.ca_file ({ca})"
            )
        if isinstance(e, ssl.SSLError):
            reason = str(e.reason or e)
            if any(alert in reason for alert in _CLIENT_CERT_ALERTS):
                return (
                    f"it refused our client certificate ({reason}): check "
                    "redis.tls.cert_file and redis.tls.key_file"
                )
            return (
                f"TLS failed ({reason}): does the server speak TLS there? (redis.tls.ca_file {ca})"
            )
        if isinstance(e, AuthenticationError) or (
            isinstance(e, ResponseError) and str(e).split(" ", 1)[0] in ("WRONGPASS", "NOAUTH")
        ):
            return f"it refused the user or password ({e}): check redis.url / redis.password"
    text = str(exc)
    if "No master found" in text:
        return _no_primary(text, settings)
    if any(alert in text.upper() for alert in _CLIENT_CERT_ALERTS):
        # TLS 1.3: the server's refusal of our certificate arrives as a read error.
        return (
            f"it refused our client certificate ({text}): check redis.tls.cert_file and "
            "redis.tls.key_file"
        )
    if any(isinstance(e, TimeoutError | RedisTimeoutError) for e in _chain(exc)):
        tls = ", or no TLS on that port" if (settings.target and settings.target.tls) else ""
        return f"no answer within {timeout_s:.0f}s (unreachable, or packets dropped{tls})"
    if isinstance(exc, RedisConnectionError | OSError):
        return f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _no_primary(text: str, settings: RedisSettings) -> str:
    """redis-py's MasterNotFoundError, said for an operator: which Sentinels answered."""
    target = settings.target
    service = target.service_name if target else "?"
    if "WRONGPASS" in text or "NOAUTH" in text or "AuthenticationError" in text:
        return "the Sentinels refused the password (redis.sentinel_password)"
    if "Error" in text.partition(":")[2]:
        return f"no Sentinel answered for {service!r} ({text.partition(' : ')[2][:300]})"
    return f"the Sentinels know no primary named {service!r} (or it is down)"
