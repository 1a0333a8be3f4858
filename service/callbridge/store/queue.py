"""The durable delivery queue of one subscription, all in one Redis hash slot.

Keys (``{s:<name>}`` tag): a sorted set of due deliveries scored by due time, a
sorted set of in-flight deliveries scored by their visibility deadline, a sorted
set of dead letters, one hash per delivery (payload, state, attempt history) and
an endpoint hash (disabled flag, circuit breaker). Every state change is one Lua
script, so a crash between two lines of ours leaves each delivery either due,
in flight (and reclaimed by the sweep after its deadline), delivered or dead.

Times in scripts come from the Redis server clock (``TIME``), so replicas with
skewed clocks agree on what is due.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from callbridge.models import Event
from callbridge.store.connection import Redis
from callbridge.store.keys import Keys
from callbridge.store.records import (
    NO_POLICY,
    Claimed,
    Completion,
    CompletionPolicy,
    EndpointState,
    outcomes_arg,
)
from callbridge.store.scripts import register
from callbridge.tracing import trace_id_of

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def call_key(event: Event) -> str:
    """The ordering key of an event: one per call ("" for batch events, unordered)."""
    return f"{event.batch_id}/{event.call_id}" if event.call_id else ""


class DeliveryQueue:
    """Enqueue, claim, complete and inspect deliveries of every subscription."""

    def __init__(
        self, redis: Redis, keys: Keys, on_dead: Callable[[str, int], None] | None = None
    ) -> None:
        self._redis = redis
        self._keys = keys
        # Told of every dead letter the scripts make, whichever path made it (an
        # attempt's outcome, the backlog bound, age while the breaker is open, a claim
        # given back past its schedule): `callbridge_dead_letters_total`.
        self._on_dead = on_dead
        self._enqueue = register(redis, "enqueue")
        self._claim = register(redis, "claim")
        self._complete = register(redis, "complete")
        self._sweep = register(redis, "sweep")
        self._requeue = register(redis, "requeue")
        self._reclaim = register(redis, "reclaim")
        self._promote = register(redis, "promote")

    async def enqueue(
        self,
        sub: str,
        events: list[tuple[Event, int]],
        *,
        max_backlog: int = 2**62,
        dead_retention_ms: int = 14 * 86_400_000,
    ) -> tuple[int, int]:
        """Add deliveries of (event, observed_ms) to `sub`; existing ones are left alone.

        Returns (created, of which dead-lettered at once because `sub` already held
        `max_backlog` undelivered deliveries).
        """
        if not events:
            return 0, 0
        k = self._keys
        keys = [k.due(sub), k.chain(sub), k.parked(sub), k.inflight(sub), k.dead(sub), k.ops(sub)]
        args: list[Any] = [k.record_prefix(sub), max_backlog, dead_retention_ms]
        for ev, observed_ms in events:
            args += (call_key(ev), ev.id, ev.type, ev.body, observed_ms, ev.batch_id, ev.trace)
        added, overflow = await self._enqueue(keys=keys, args=args)
        self._dead(sub, int(overflow))
        return int(added), int(overflow)

    def _dead(self, sub: str, n: int) -> None:
        if n and self._on_dead is not None:
            self._on_dead(sub, n)

    async def claim(
        self, sub: str, *, max_in_flight: int, limit: int, visibility_ms: int, token: str
    ) -> list[Claimed]:
        """Claim due deliveries for worker `token`. Each call claims under a token of
        its own (the worker's plus a unique part), so a call re-sent after a lost reply
        returns the same deliveries instead of holding more slots until their deadline."""
        _, claimed = await self.step(
            sub, (), None, max_in_flight=max_in_flight, limit=limit,
            visibility_ms=visibility_ms, token=token,
        )  # fmt: skip
        return claimed

    async def step(
        self,
        sub: str,
        outcomes: Sequence[Completion],
        policy: CompletionPolicy | None,
        *,
        max_in_flight: int,
        limit: int,
        visibility_ms: int,
        token: str,
        expire_ms: int = 0,
        detach_ms: int = 0,
        call: str = "",
    ) -> tuple[list[str], list[Claimed]]:
        """Record `outcomes` (as `complete`), then claim up to `limit` (as `claim`),
        in one round trip: a worker's finished attempts free the slots its next
        claims take. Returns (what applied per outcome, the claimed deliveries).
        `expire_ms`: while the breaker is open, due deliveries older than this are
        dead-lettered unsent (0: never). `detach_ms`: claims older than this no longer
        count against `max_in_flight` (0: all count); see claim.lua. `call`: the claim
        token of a step that failed, sent again (else a new one under `token`).
        """
        k = self._keys
        claim_token = call or f"{token}:{uuid.uuid4().hex[:12]}"
        p = policy or NO_POLICY
        applied, raw, *now = await self._claim(
            keys=[k.due(sub), k.inflight(sub), k.endpoint(sub), k.dead(sub), k.chain(sub),
                  k.parked(sub), k.claim_receipt(sub, claim_token), k.ops(sub)],
            args=[
                k.record_prefix(sub), max_in_flight, limit, visibility_ms, claim_token,
                outcomes_arg(outcomes) if outcomes else b"",
                p.retention_ms, p.dead_retention_ms, p.breaker_threshold, p.cooloff_ms,
                p.cooloff_max_ms, p.history_max, p.breaker_failure_ratio,
                p.breaker_min_attempts, p.breaker_window_ms, expire_ms, detach_ms,
            ],
        )  # fmt: skip
        claimed = [
            Claimed(
                event_id=raw[i].decode(),
                attempts=int(raw[i + 1]),
                body=raw[i + 2],
                observed_ms=int(raw[i + 3] or 0),
                token=claim_token,
                claimed_ms=int(now[0]) if now else 0,
                trace=(raw[i + 4] or b"").decode(),
            )
            for i in range(0, len(raw), 5)
        ]
        if len(now) > 1:  # the breaker is open: deliveries dead-lettered by age
            self._dead(sub, int(now[1]))
        texts = [_text(r) for r in applied]
        self._dead(sub, texts.count("dead"))
        return texts, claimed

    async def complete(
        self, sub: str, outcomes: Sequence[Completion], policy: CompletionPolicy
    ) -> list[str]:
        """Record attempts' outcomes (success | retry | dead | disable | release).

        Returns, per outcome, what applied, or ``stale`` when that claim had expired
        and moved on to another worker.
        """
        if not outcomes:
            return []
        k = self._keys
        keys = [k.due(sub), k.inflight(sub), k.dead(sub), k.endpoint(sub), k.chain(sub)]
        keys += [k.parked(sub), k.ops(sub)] + [k.delivery(sub, o.event_id) for o in outcomes]
        args: list[Any] = [
            policy.retention_ms,
            policy.dead_retention_ms,
            policy.breaker_threshold,
            policy.cooloff_ms,
            policy.cooloff_max_ms,
            policy.history_max,
            outcomes_arg(outcomes),
            policy.breaker_failure_ratio,
            policy.breaker_min_attempts,
            policy.breaker_window_ms,
            k.record_prefix(sub),
        ]
        result = await self._complete(keys=keys, args=args)
        texts = [_text(r) for r in result]
        self._dead(sub, texts.count("dead"))
        return texts

    def _lost_keys(self, sub: str) -> list[str]:  # sweep.lua's and reclaim.lua's
        k = self._keys
        return [k.due(sub), k.inflight(sub), k.dead(sub), k.parked(sub), k.endpoint(sub),
                k.chain(sub), k.ops(sub)]  # fmt: skip

    async def sweep(
        self, sub: str, *, dead_retention_ms: int, max_items: int = 1000,
        retries: int | None = None, history_max: int = 20, hold_max_ms: int = 600_000,
    ) -> int:  # fmt: skip
        """Give back claims whose visibility deadline passed (their worker died). With
        `retries` (the retry schedule's length) each is a failed attempt, dead-lettered
        once the schedule is used up (sweep.lua, _lost.lua). A batch event held longer
        than `hold_max_ms` for its batch's call events is freed (enqueue.lua)."""
        args: list[Any] = [self._keys.record_prefix(sub), max_items, dead_retention_ms]
        args += [-1 if retries is None else retries, history_max, hold_max_ms]
        given_back, dead = await self._sweep(keys=self._lost_keys(sub), args=args)
        self._dead(sub, int(dead))
        return int(given_back)

    async def promote(self, sub: str, *, page: int = 1000) -> tuple[int, bool]:
        """One page of the promotion that follows a recovery (promote.lua): how many
        deliveries became due now, and whether the promotion is over."""
        k = self._keys
        promoted, done = await self._promote(
            keys=[k.due(sub), k.endpoint(sub)], args=[k.record_prefix(sub), page]
        )
        return int(promoted), bool(int(done))

    async def ops_events(self, sub: str, count: int = 100) -> list[tuple[bytes, dict[str, str]]]:
        """The oldest operational events of `sub` not handed on yet: (stream id, fields)."""
        rows = await self._redis.xrange(self._keys.ops(sub), count=count)
        return [(sid, {_text(k): _text(v) for k, v in fields.items()}) for sid, fields in rows]

    async def ack_ops(self, sub: str, stream_ids: Sequence[bytes]) -> None:
        """Forget operational events handed on (their deliveries exist)."""
        if stream_ids:
            await self._redis.xdel(self._keys.ops(sub), *stream_ids)

    async def reclaim_own(
        self, sub: str, replica: str, current: str, *, retries: int | None = None,
        history_max: int = 20, dead_retention_ms: int = 0,
    ) -> int:  # fmt: skip
        """Give back claims of `replica`'s earlier processes (all but `current`); with
        `retries`, each one counts as a failed attempt (as in `sweep`)."""
        args: list[Any] = [self._keys.record_prefix(sub), f"{replica}:", f"{current}:"]
        if retries is not None:
            args += [retries, history_max, dead_retention_ms]
        given_back, dead = await self._reclaim(keys=self._lost_keys(sub), args=args)
        self._dead(sub, int(dead))
        return int(given_back)

    # -- inspection and operator actions --------------------------------------

    async def depths(self, sub: str) -> dict[str, int]:
        """Deliveries by state: ready (due now), scheduled (later), inflight, dead, and
        waiting (for the first attempt of their call's previous event)."""
        k = self._keys
        now_s, now_us = await self._redis.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcount(k.due(sub), "-inf", now_ms)
            pipe.zcard(k.due(sub))
            pipe.zcard(k.inflight(sub))
            pipe.zcard(k.dead(sub))
            pipe.zcard(k.parked(sub))
            ready, due_total, inflight, dead, waiting = await pipe.execute()
        return {
            "ready": int(ready),
            "scheduled": int(due_total) - int(ready),
            "inflight": int(inflight),
            "dead": int(dead),
            "waiting": int(waiting),
        }

    async def endpoint(self, sub: str) -> EndpointState:
        raw = await self._redis.hgetall(self._keys.endpoint(sub))
        # Not pipelined: Redis Cluster refuses TIME in a pipeline.
        now_s, now_us = await self._redis.time()
        return EndpointState(
            disabled=raw.get(b"disabled") == b"1",
            disabled_reason=(raw.get(b"disabled_reason") or b"").decode(),
            failures=int(raw.get(b"failures") or 0),
            open_until_ms=int(raw.get(b"open_until") or 0),
            paced_until_ms=int(raw.get(b"paced_until") or 0),
            now_ms=int(now_s) * 1000 + int(now_us) // 1000,
            failing_since_ms=int(raw.get(b"failing_since") or 0),
            promoting=int(raw.get(b"promote_from") or 0) > 0,
        )

    async def set_enabled(self, sub: str, enabled: bool, reason: str = "operator") -> None:
        key = self._keys.endpoint(sub)
        if enabled:
            # Re-enabling also closes the breaker (and forgets the failure window): the
            # operator says the endpoint is back.
            await self._redis.hdel(key, *(f"w{c}{i}" for c in "bof" for i in range(3)))
            fields = ("failures", "conn_failures", "open_until", "opens", "failing_since",
                      "probing_until")  # fmt: skip
            await self._redis.hset(key, mapping={"disabled": "0", **dict.fromkeys(fields, 0)})
        else:
            await self._redis.hset(key, mapping={"disabled": "1", "disabled_reason": reason})

    async def record(self, sub: str, event_id: str) -> dict[str, Any] | None:
        """A delivery's state and attempt history (payload excluded)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.delivery(sub, event_id))
            pipe.zscore(self._keys.due(sub), event_id)
            raw, due = await pipe.execute()
        if not raw:
            return None
        state = raw[b"state"].decode()
        return {
            "event_id": event_id,
            "type": raw[b"type"].decode(),
            "state": state,
            "attempts": int(raw[b"attempts"]),
            "created_ms": int(raw[b"created_ms"]),
            "history": orjson.loads(raw[b"history"]),
            # When its next attempt is due (Redis clock); None unless it waits for one.
            "next_attempt_ms": int(due) if due is not None and state == "pending" else None,
            "trace_id": trace_id_of(raw.get(b"trace", b"").decode()),
        }

    async def body(self, sub: str, event_id: str) -> bytes | None:
        """The exact payload a delivery sends (what its receiver verifies)."""
        raw: bytes | None = await self._redis.hget(self._keys.delivery(sub, event_id), "body")
        return raw

    async def dead_letters(self, sub: str, limit: int = 100, offset: int = 0) -> list[str]:
        rows = await self._redis.zrange(self._keys.dead(sub), offset, offset + limit - 1)
        return [r.decode() for r in rows]

    async def dead_count(self, sub: str) -> int:
        return int(await self._redis.zcard(self._keys.dead(sub)))

    async def requeue(
        self, sub: str, event_id: str, *, reset_attempts: bool, only_dead: bool = False,
        max_backlog: int = 0,
    ) -> int:  # fmt: skip
        """Make a dead (or delivered) delivery due now: 1 done, 0 not, 2 on its way
        already, -1 the backlog (`max_backlog`, 0: unbounded) is full; see requeue.lua."""
        k = self._keys
        return int(await self._requeue(
            keys=[k.due(sub), k.dead(sub), k.delivery(sub, event_id), k.parked(sub),
                  k.inflight(sub)],
            args=[event_id, int(reset_attempts), "dead" if only_dead else "", max_backlog],
        ))  # fmt: skip
