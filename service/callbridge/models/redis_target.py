"""What a ``redis.url`` names: one server, a Cluster, or a primary behind Sentinels.

Pure parsing, here in the shared core so that the settings model rejects a bad URL at
load time (``check-config`` exits 2 naming ``redis.url``) and the store connects from
the same reading of it. Messages never repeat the URL: it may carry a password.

    redis://[[user]:password@]host[:port][/db]            one server (rediss://: TLS)
    unix://[[user]:password@]/path/to/socket[?db=N]       one server on a socket
    redis+cluster://[[user]:password@]host[:port][/db]    a Cluster (any node; rediss+cluster)
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]
                                                          the primary Sentinels name
                                                          (rediss+sentinel: TLS to every node)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

Kind = Literal["single", "cluster", "sentinel", "unix"]

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("unix", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_SERVICE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``redis.url``; `password` is kept out of its repr."""

    kind: Kind
    tls: bool
    # (host, port) of the server, the Cluster's seed node, or each Sentinel.
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    service_name: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    socket_path: str | None = None

    def where(self) -> str:
        """Where it points, for messages: scheme, hosts and service; no credentials."""
        if self.kind == "unix":
            return f"unix://{self.socket_path}"
        scheme = {"single": "redis", "cluster": "redis+cluster", "sentinel": "redis+sentinel"}
        prefix = scheme[self.kind].replace("redis", "rediss", 1) if self.tls else scheme[self.kind]
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        tail = f"/{self.service_name}" if self.service_name else ""
        return f"{prefix}://{hosts}{tail}"


def parse_redis_url(url: str) -> RedisTarget:
    """`url` read as a `RedisTarget`; ValueError saying what is wrong (never the URL)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            "must start with redis://, rediss://, unix://, redis+cluster://, "
            "rediss+cluster://, redis+sentinel:// or rediss+sentinel://"
        )
    kind, tls = _SCHEMES[scheme]
    userinfo, at, location = rest.rpartition("@")
    username, password = _credentials(userinfo) if at else (None, None)
    if kind == "unix":
        parts = urlsplit(f"unix://{location}")
        if not parts.path:
            raise ValueError("unix:// needs the socket's path (unix:///run/redis.sock)")
        db = _db_query(parts.query)
        return RedisTarget(kind, False, (), db, None, username, password, parts.path)
    location, _, query = location.partition("?")
    if query and kind == "sentinel":
        raise ValueError("redis+sentinel:// takes no ?options: use the redis.* settings")
    netloc, _, path = location.partition("/")
    default_port = DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_PORT
    hosts = tuple(_host_port(h, default_port) for h in netloc.split(","))
    segments = [s for s in path.split("/") if s] if path else []
    if kind == "sentinel":
        if not segments:
            raise ValueError(
                "redis+sentinel:// needs the service name after the Sentinels "
                "(redis+sentinel://s1:26379,s2:26379/mymaster[/db])"
            )
        service = unquote(segments[0])
        if not _SERVICE.fullmatch(service):
            raise ValueError("the service name must be 1-128 letters, digits, _ . -")
        db = _db(segments[1:])
        return RedisTarget(kind, tls, hosts, db, service, username, password)
    if len(hosts) > 1:
        raise ValueError(
            "several hosts are only for redis+sentinel:// (a Cluster needs one seed node)"
        )
    db = _db(segments) if segments else _db_query(query)
    if kind == "cluster" and db != 0:
        raise ValueError("a Redis Cluster has only database 0")
    return RedisTarget(kind, tls, hosts, db, None, username, password)


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    user, colon, password = userinfo.partition(":")
    if not colon:
        # As redis-py reads "redis://name@host": a user without a password.
        return unquote(user) or None, None
    return unquote(user) or None, unquote(password) or None


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if not text:
        raise ValueError("a host is missing (an empty name between commas, or none at all)")
    host, port_text = text, ""
    if text.startswith("["):
        host, _, tail = text.partition("]")
        host += "]"
        port_text = tail.removeprefix(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not _HOST.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or address")
    if not port_text:
        return host.strip("[]"), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"host {host}: the port must be a number 1-65535")
    return host.strip("[]"), int(port_text)


def _db(segments: list[str]) -> int:
    if not segments:
        return 0
    if len(segments) > 1 or not segments[0].isdigit():
        raise ValueError("the path must be the database number (/0)")
    return int(segments[0])


def _db_query(query: str) -> int:
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if name == "db":
            if not value.isdigit():
                raise ValueError("?db= must be a number")
            return int(value)
    return 0
