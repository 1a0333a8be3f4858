"""Every Redis command the bridge sends, and the ACL rule of its least-privileged user.

The list is the contract between the code and an operator's ``ACL SETUSER``: the
README prints `acl_rule()` (a test keeps the two equal), a test creates that user and
runs the turbulence scenario as it, and at start `store.preflight` asks Redis whether
this user may send each command (queued in a MULTI that is then discarded: nothing
runs), so a rule missing one fails the start naming it instead of a command failing
hours later. Commands inside the Lua scripts (``redis.call``) are checked against the
user's ACL like any other, so they are listed too.
"""

from __future__ import annotations

# Probe keys: under the prefix (the rule's key pattern) and in one hash slot (a
# Cluster queues a command only when its keys share a slot).
_A, _B = "{acl-probe}:a", "{acl-probe}:b"
_NO_SHA = "0" * 40

# Each command with arguments of the right arity; a key argument is relative to the
# key prefix. Sent on connect by redis-py: CLIENT SETINFO (refusal ignored), SELECT
# (db other than 0), AUTH; PING is its health check.
REQUIRED: tuple[tuple[str, ...], ...] = (
    # connection, clock
    ("PING",), ("SELECT", "0"), ("TIME",),
    # the Lua scripts: EVALSHA, loaded on first use and again after a restart
    ("EVALSHA", _NO_SHA, "0"), ("SCRIPT", "LOAD", "return 1"),
    ("SCRIPT", "EXISTS", _NO_SHA),
    # WAIT: redis.min_replicas_to_ack (writes that must reach replicas)
    ("WAIT", "0", "0"),
    # strings and keys
    ("GET", _A), ("SET", _A, "1"), ("DEL", _A), ("UNLINK", _A), ("EXISTS", _A),
    ("PEXPIRE", _A, "1000"), ("PERSIST", _A), ("PTTL", _A), ("SCAN", "0"),
    # hashes
    ("HGET", _A, "f"), ("HMGET", _A, "f"), ("HGETALL", _A), ("HSET", _A, "f", "v"),
    ("HSETNX", _A, "f", "v"), ("HDEL", _A, "f"), ("HINCRBY", _A, "f", "1"), ("HSCAN", _A, "0"),
    # sorted sets
    ("ZADD", _A, "1", "m"), ("ZCARD", _A), ("ZCOUNT", _A, "0", "1"), ("ZPOPMIN", _A),
    ("ZRANGE", _A, "0", "1"), ("ZRANGEBYSCORE", _A, "0", "1"), ("ZREVRANGE", _A, "0", "1"),
    ("ZRANGESTORE", _B, _A, "0", "1"), ("ZREM", _A, "m"), ("ZREMRANGEBYSCORE", _A, "0", "1"),
    # streams (the outbox, operational events)
    ("XADD", _A, "*", "f", "v"), ("XRANGE", _A, "-", "+"), ("XDEL", _A, "0-1"),
)  # fmt: skip
# Wanted, not needed: without them the bridge runs and says what it cannot do.
OPTIONAL: tuple[tuple[str, ...], ...] = (
    # The persistence check (appendonly, save, maxmemory-policy): a warning if refused.
    ("CONFIG", "GET", "appendonly"),
    # The client library's name in CLIENT LIST (redis-py ignores a refusal).
    ("CLIENT", "SETINFO", "LIB-NAME", "redis-py"),
)
# The start-up probe's own transaction: in the rule, never queued (a queued DISCARD
# would end the probe's MULTI and let the commands after it run).
PROBE: tuple[str, ...] = ("MULTI", "DISCARD")
_KEYS = {_A, _B}
# Commands written as "SCRIPT LOAD" in an ACL rule (a subcommand) are "script|load".
_WITH_SUBCOMMAND = {"SCRIPT", "CONFIG", "CLIENT"}


def command_name(args: tuple[str, ...]) -> str:
    """``SCRIPT LOAD`` for ``("SCRIPT", "LOAD", ...)``, ``HSET`` for ``("HSET", ...)``."""
    return f"{args[0]} {args[1]}" if args[0] in _WITH_SUBCOMMAND else args[0]


def probe_args(args: tuple[str, ...], key_prefix: str) -> tuple[str, ...]:
    """`args` with its probe keys under `key_prefix`."""
    return tuple(f"{key_prefix}:{a}" if a in _KEYS else a for a in args)


def acl_rule(user: str = "callbridge", key_prefix: str = "cb") -> str:
    """``ACL SETUSER`` for the least-privileged user: our commands, our keys, no channels."""
    names = dict.fromkeys(command_name(c).lower().replace(" ", "|") for c in (*REQUIRED, *OPTIONAL))
    names.update(dict.fromkeys(c.lower() for c in PROBE))
    commands = " ".join(f"+{n}" for n in names)
    return (
        f"ACL SETUSER {user} on >PASSWORD resetkeys ~{key_prefix}:* resetchannels -@all {commands}"
    )
