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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from callbridge.constants import Keys
from callbridge.models import Event
from callbridge.redisconn import Redis

log = logging.getLogger(__name__)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: due, chain, record... ; ARGV: call-key, event id, type, body, observed_ms (x5 each)
_ENQUEUE = (
    _NOW
    + """
local due, chain = KEYS[1], KEYS[2]
local added = 0
local n = (#ARGV) / 5
for j = 0, n - 1 do
  local rec = KEYS[3 + j]
  local callkey, id, etype, body, observed = ARGV[j*5+1], ARGV[j*5+2], ARGV[j*5+3],
                                             ARGV[j*5+4], ARGV[j*5+5]
  -- A delivery that exists (pending, done or dead) is never enqueued twice:
  -- the relay may run again for the same outbox entries after a crash.
  if redis.call('EXISTS', rec) == 0 then
    local prev = ''
    if callkey ~= '' then
      prev = redis.call('HGET', chain, callkey) or ''
      redis.call('HSET', chain, callkey, id)
    end
    redis.call('HSET', rec, 'body', body, 'type', etype, 'state', 'pending', 'attempts', 0,
               'created_ms', now, 'observed_ms', observed, 'prev', prev, 'callkey', callkey,
               'history', '[]')
    redis.call('ZADD', due, now, id)
    added = added + 1
  end
end
return added
"""
)

# KEYS: due, inflight, endpoint ; ARGV: prefix, max_in_flight, limit, visibility_ms, token
_CLAIM = (
    _NOW
    + """
local due, inflight, endpoint = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[1]
local max_in_flight, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local visibility, token = tonumber(ARGV[4]), ARGV[5]
local ep = redis.call('HMGET', endpoint, 'disabled', 'open_until')
if ep[1] == '1' then return {} end
local open_until = tonumber(ep[2] or '0')
if open_until > now then return {} end
local busy = redis.call('ZCARD', inflight)
if open_until > 0 then
  -- Half-open: one probe at a time until a success closes the breaker.
  if busy > 0 then return {} end
  max_in_flight = 1
end
local free = math.min(max_in_flight - busy, limit)
if free <= 0 then return {} end
local out = {}
-- Scan due deliveries in pages: a long run of events of one call, each waiting for
-- its predecessor, must not hide the due deliveries of other calls behind it.
local scanned, offset, page = 0, 0, free * 2 + 16
while scanned < 2000 do
  local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', offset, page)
  if #ids == 0 then break end
  scanned = scanned + #ids
  for _, id in ipairs(ids) do
    local rec = prefix .. ':d:' .. id
    local f = redis.call('HMGET', rec, 'prev', 'attempts', 'body', 'observed_ms')
    local blocked = false
    if not f[3] then
      redis.call('ZREM', due, id)  -- record expired or deleted: nothing to send
      offset = offset - 1
      blocked = true
    elseif f[1] and f[1] ~= '' then
      -- Per-call order: wait while the call's previous event has not had its
      -- first attempt to this subscription.
      local p = redis.call('HMGET', prefix .. ':d:' .. f[1], 'state', 'attempts')
      if p[1] and (p[1] == 'pending' or p[1] == 'inflight') and p[2] == '0' then
        blocked = true
      end
    end
    if not blocked then
      redis.call('ZREM', due, id)
      offset = offset - 1
      redis.call('ZADD', inflight, now + visibility, id)
      redis.call('HSET', rec, 'state', 'inflight', 'claim', token)
      out[#out + 1] = id
      out[#out + 1] = f[2]
      out[#out + 1] = f[3]
      out[#out + 1] = f[4]
      if #out / 4 >= free then return out end
    end
  end
  offset = offset + #ids
end
return out
"""
)

# KEYS: due, inflight, dead, endpoint, chain, record... (one per outcome)
# ARGV: retention_ms, dead_retention_ms, breaker_threshold, cooloff_ms, cooloff_max_ms,
#       history_max, JSON [[id, token, outcome, delay_ms, history_entry_json], ...]
# Several outcomes in one call: a busy endpoint's results are recorded in batches.
_COMPLETE = (
    _NOW
    + """
local due, inflight, dead, endpoint, chain = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local retention, dead_retention = tonumber(ARGV[1]), tonumber(ARGV[2])
local threshold, cooloff, cooloff_max = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local history_max = tonumber(ARGV[6])

local function complete(rec, id, token, outcome, delay, entry)
  local state = redis.call('HGET', rec, 'state')
  if not state then return 'gone' end
  if state ~= 'inflight' or redis.call('HGET', rec, 'claim') ~= token then
    -- Our claim timed out and the delivery was handed to another worker (or it was
    -- replayed): record nothing, that worker owns the outcome now.
    return 'stale'
  end
  redis.call('ZREM', inflight, id)
  redis.call('HSET', rec, 'claim', '')
  if outcome == 'release' then
    -- Shutdown handed the claim back before an answer came: not an attempt.
    redis.call('HSET', rec, 'state', 'pending')
    redis.call('ZADD', due, now, id)
    return outcome
  end
  local history = cjson.decode(redis.call('HGET', rec, 'history'))
  history[#history + 1] = cjson.decode(entry)
  while #history > history_max do table.remove(history, 1) end
  redis.call('HSET', rec, 'history', cjson.encode(history))
  local function release_chain()
    local callkey = redis.call('HGET', rec, 'callkey')
    if callkey and callkey ~= '' and redis.call('HGET', chain, callkey) == id then
      redis.call('HDEL', chain, callkey)
    end
  end
  if outcome == 'disable' then
    -- 410 Gone: the endpoint is switched off, this delivery waits with the others.
    redis.call('HSET', endpoint, 'disabled', '1', 'disabled_reason', '410 Gone',
               'disabled_ms', now)
    redis.call('HSET', rec, 'state', 'pending')
    redis.call('ZADD', due, now, id)
    return outcome
  end
  redis.call('HINCRBY', rec, 'attempts', 1)
  if outcome == 'success' then
    redis.call('HSET', rec, 'state', 'delivered', 'delivered_ms', now)
    redis.call('PEXPIRE', rec, retention)
    release_chain()
    redis.call('HSET', endpoint, 'failures', 0, 'open_until', 0, 'opens', 0)
    return outcome
  end
  -- A failed attempt: count it towards the breaker.
  local failures = redis.call('HINCRBY', endpoint, 'failures', 1)
  local open_until = tonumber(redis.call('HGET', endpoint, 'open_until') or '0')
  -- Open (or, after a failed half-open probe, reopen) unless already open: failures
  -- of requests that were in flight when it opened must not stretch the pause.
  if open_until <= now and (failures >= threshold or open_until > 0) then
    local opens = redis.call('HINCRBY', endpoint, 'opens', 1)
    local pause = math.min(cooloff * 2 ^ (opens - 1), cooloff_max)
    redis.call('HSET', endpoint, 'open_until', now + pause)
  end
  if outcome == 'dead' then
    redis.call('HSET', rec, 'state', 'dead', 'dead_ms', now)
    redis.call('ZADD', dead, now, id)
    redis.call('PEXPIRE', rec, dead_retention)
    release_chain()
  else
    redis.call('HSET', rec, 'state', 'pending')
    redis.call('ZADD', due, now + delay, id)
  end
  return outcome
end

local out = {}
-- One JSON argument for all outcomes: packing five arguments per outcome cost the
-- client more CPU than the whole script costs the server.
local items = cjson.decode(ARGV[7])
for j, o in ipairs(items) do
  out[#out + 1] = complete(KEYS[5 + j], o[1], o[2], o[3], tonumber(o[4]), o[5])
end
return out
"""
)

# KEYS: due, inflight, dead ; ARGV: prefix, max, dead_retention_ms
_SWEEP = (
    _NOW
    + """
-- Dead letters whose record expired are gone: drop them from the index too.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[3]))
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  local rec = ARGV[1] .. ':d:' .. id
  if redis.call('EXISTS', rec) == 1 then
    redis.call('HSET', rec, 'state', 'pending', 'claim', '')
    redis.call('ZADD', KEYS[1], now, id)
  end
end
return #ids
"""
)

# KEYS: due, dead, record ; ARGV: id, reset_attempts(0/1)
_REQUEUE = (
    _NOW
    + """
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return 0 end
if state == 'inflight' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PERSIST', KEYS[3])
redis.call('HSET', KEYS[3], 'state', 'pending', 'prev', '')
if ARGV[2] == '1' then redis.call('HSET', KEYS[3], 'attempts', 0) end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
"""
)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery handed to this worker until its visibility deadline."""

    event_id: str
    attempts: int  # completed attempts before this one
    body: bytes
    observed_ms: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt of a claimed delivery came to."""

    event_id: str
    token: str
    outcome: str  # success | retry | dead | disable | release
    delay_ms: int = 0
    attempt: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CompletionPolicy:
    """Subscription-independent knobs the completion script applies."""

    retention_ms: int
    dead_retention_ms: int
    breaker_threshold: int
    cooloff_ms: int
    cooloff_max_ms: int
    history_max: int = 20


@dataclass(frozen=True, slots=True)
class EndpointState:
    disabled: bool
    disabled_reason: str
    failures: int
    open_until_ms: int


def call_key(event: Event) -> str:
    """The ordering key of an event: one per call ("" for batch events, unordered)."""
    return f"{event.batch_id}/{event.call_id}" if event.call_id else ""


class DeliveryQueue:
    """Enqueue, claim, complete and inspect deliveries of every subscription."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._enqueue = redis.register_script(_ENQUEUE)
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self._sweep = redis.register_script(_SWEEP)
        self._requeue = redis.register_script(_REQUEUE)

    async def enqueue(self, sub: str, events: list[tuple[Event, int]]) -> int:
        """Add deliveries of (event, observed_ms) to `sub`; existing ones are left alone."""
        if not events:
            return 0
        k = self._keys
        keys = [k.due(sub), k.chain(sub)] + [k.delivery(sub, ev.id) for ev, _ in events]
        args: list[Any] = []
        for ev, observed_ms in events:
            args += (call_key(ev), ev.id, ev.type, ev.body, observed_ms)
        return int(await self._enqueue(keys=keys, args=args))

    async def claim(
        self, sub: str, *, max_in_flight: int, limit: int, visibility_ms: int, token: str
    ) -> list[Claimed]:
        k = self._keys
        raw = await self._claim(
            keys=[k.due(sub), k.inflight(sub), k.endpoint(sub)],
            args=[k.sub_prefix(sub), max_in_flight, limit, visibility_ms, token],
        )
        return [
            Claimed(
                event_id=raw[i].decode(),
                attempts=int(raw[i + 1]),
                body=raw[i + 2],
                observed_ms=int(raw[i + 3] or 0),
            )
            for i in range(0, len(raw), 4)
        ]

    async def complete(
        self, sub: str, outcomes: Sequence[Outcome], policy: CompletionPolicy
    ) -> list[str]:
        """Record attempts' outcomes (success | retry | dead | disable | release).

        Returns, per outcome, what applied, or ``stale`` when that claim had expired
        and moved on to another worker.
        """
        if not outcomes:
            return []
        k = self._keys
        keys = [k.due(sub), k.inflight(sub), k.dead(sub), k.endpoint(sub), k.chain(sub)]
        keys += [k.delivery(sub, o.event_id) for o in outcomes]
        args: list[Any] = [
            policy.retention_ms,
            policy.dead_retention_ms,
            policy.breaker_threshold,
            policy.cooloff_ms,
            policy.cooloff_max_ms,
            policy.history_max,
        ]
        args.append(
            orjson.dumps(
                [
                    [o.event_id, o.token, o.outcome, o.delay_ms, orjson.dumps(o.attempt).decode()]
                    for o in outcomes
                ]
            )
        )
        result = await self._complete(keys=keys, args=args)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in result]

    async def sweep(self, sub: str, *, dead_retention_ms: int, max_items: int = 1000) -> int:
        """Give back claims whose visibility deadline passed (their worker died)."""
        k = self._keys
        return int(
            await self._sweep(
                keys=[k.due(sub), k.inflight(sub), k.dead(sub)],
                args=[k.sub_prefix(sub), max_items, dead_retention_ms],
            )
        )

    async def next_due_ms(self, sub: str) -> int | None:
        """Due time of the earliest scheduled delivery, if any."""
        rows = await self._redis.zrange(self._keys.due(sub), 0, 0, withscores=True)
        return int(rows[0][1]) if rows else None

    # -- inspection and operator actions --------------------------------------

    async def depths(self, sub: str) -> dict[str, int]:
        """Deliveries by state: ready (due now), scheduled (later), inflight, dead."""
        k = self._keys
        now_s, now_us = await self._redis.time()
        now_ms = int(now_s) * 1000 + int(now_us) // 1000
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcount(k.due(sub), "-inf", now_ms)
            pipe.zcard(k.due(sub))
            pipe.zcard(k.inflight(sub))
            pipe.zcard(k.dead(sub))
            ready, due_total, inflight, dead = await pipe.execute()
        return {
            "ready": int(ready),
            "scheduled": int(due_total) - int(ready),
            "inflight": int(inflight),
            "dead": int(dead),
        }

    async def endpoint(self, sub: str) -> EndpointState:
        raw = await self._redis.hgetall(self._keys.endpoint(sub))
        return EndpointState(
            disabled=raw.get(b"disabled") == b"1",
            disabled_reason=(raw.get(b"disabled_reason") or b"").decode(),
            failures=int(raw.get(b"failures") or 0),
            open_until_ms=int(raw.get(b"open_until") or 0),
        )

    async def set_enabled(self, sub: str, enabled: bool, reason: str = "operator") -> None:
        key = self._keys.endpoint(sub)
        if enabled:
            # Re-enabling also closes the breaker: the operator says the endpoint is back.
            await self._redis.hset(
                key, mapping={"disabled": "0", "failures": 0, "open_until": 0, "opens": 0}
            )
        else:
            await self._redis.hset(key, mapping={"disabled": "1", "disabled_reason": reason})

    async def record(self, sub: str, event_id: str) -> dict[str, Any] | None:
        """A delivery's state and attempt history (payload excluded)."""
        raw = await self._redis.hgetall(self._keys.delivery(sub, event_id))
        if not raw:
            return None
        return {
            "event_id": event_id,
            "type": raw[b"type"].decode(),
            "state": raw[b"state"].decode(),
            "attempts": int(raw[b"attempts"]),
            "created_ms": int(raw[b"created_ms"]),
            "history": orjson.loads(raw[b"history"]),
        }

    async def dead_letters(self, sub: str, limit: int = 100, offset: int = 0) -> list[str]:
        rows = await self._redis.zrange(self._keys.dead(sub), offset, offset + limit - 1)
        return [r.decode() for r in rows]

    async def requeue(self, sub: str, event_id: str, *, reset_attempts: bool) -> bool:
        """Make a dead or delivered delivery due again now (replay / redeliver)."""
        k = self._keys
        return bool(
            await self._requeue(
                keys=[k.due(sub), k.dead(sub), k.delivery(sub, event_id)],
                args=[event_id, "1" if reset_attempts else "0"],
            )
        )
