-- complete.lua: record the outcomes of attempts of one subscription, several at once.
--
-- KEYS[1] due  KEYS[2] inflight  KEYS[3] dead  KEYS[4] endpoint  KEYS[5] chain
-- KEYS[6] parked
-- KEYS[6+j]    record hash of the j-th outcome's delivery
--
-- ARGV[1] retention_ms       delivered records are kept this long
-- ARGV[2] dead_retention_ms  dead letters are kept this long
-- ARGV[3] conn_threshold     consecutive connection failures that open the breaker
-- ARGV[4] cooloff_ms  ARGV[5] cooloff_max_ms   breaker pause, doubling per reopen
-- ARGV[6] history_max        attempts kept in a record's history
-- ARGV[7] JSON list of outcomes, in KEYS order:
--         [[event id, claim token, outcome, delay_ms, history entry JSON, kind,
--           pace_ms], ...]
--         outcome: success | retry | dead | disable | release
--         kind: ok | fail | conn (no connection: refused, DNS, TLS) | paced (429:
--         half the endpoint's requests at once for pace_ms; not a breaker failure)
-- ARGV[8] failure_ratio  ARGV[9] min_attempts  ARGV[10] window_ms
-- ARGV[11] prefix        the subscription's key prefix (records are prefix:d:<id>)
--         the breaker opens when at least failure_ratio of at least min_attempts
--         attempts in the last window_ms failed (3 buckets of window_ms / 3)
--
-- Endpoint hash fields: disabled, open_until, opens (reopen count), failures
-- (consecutive, informative), conn_failures, paced_until, wb<i>/wo<i>/wf<i>
-- (bucket id, successes and failures of window bucket i).
--
-- Reply: per outcome, what applied: the outcome itself, 'stale' when the claim had
-- expired and moved to another worker (nothing recorded), 'gone' when the record
-- no longer exists. Idempotent: an outcome sent again for the same claim (a lost
-- reply re-sent by the client) returns what applied the first time, changing nothing.
--#include now
local due, inflight, dead, endpoint, chain = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local parked, prefix = KEYS[6], ARGV[11]
local retention, dead_retention = tonumber(ARGV[1]), tonumber(ARGV[2])
local threshold, cooloff, cooloff_max = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local history_max = tonumber(ARGV[6])
local ratio, min_attempts = tonumber(ARGV[8]), tonumber(ARGV[9])
local bucket_ms = math.max(1, math.floor(tonumber(ARGV[10]) / 3))

-- Count an attempt in the sliding window; returns failures and total over it.
local function window_add(ok)
  local bid = math.floor(now / bucket_ms)
  local slot = bid % 3
  if tonumber(redis.call('HGET', endpoint, 'wb' .. slot) or '-1') ~= bid then
    redis.call('HSET', endpoint, 'wb' .. slot, bid, 'wo' .. slot, 0, 'wf' .. slot, 0)
  end
  redis.call('HINCRBY', endpoint, ok and ('wo' .. slot) or ('wf' .. slot), 1)
  local fails, total = 0, 0
  for i = 0, 2 do
    local f = redis.call('HMGET', endpoint, 'wb' .. i, 'wo' .. i, 'wf' .. i)
    if f[1] and bid - tonumber(f[1]) <= 2 then
      fails = fails + tonumber(f[3] or '0')
      total = total + tonumber(f[2] or '0') + tonumber(f[3] or '0')
    end
  end
  return fails, total
end

local function complete(rec, id, token, outcome, delay, entry, kind, pace)
  local state = redis.call('HGET', rec, 'state')
  if not state then return 'gone' end
  if state ~= 'inflight' or redis.call('HGET', rec, 'claim') ~= token then
    local done = redis.call('HMGET', rec, 'done', 'done_outcome')
    if done[1] == token then return done[2] end
    -- Our claim timed out and the delivery was handed to another worker (or it was
    -- replayed): record nothing, that worker owns the outcome now.
    return 'stale'
  end
  redis.call('ZREM', inflight, id)
  redis.call('HSET', rec, 'claim', '', 'done', token, 'done_outcome', outcome)
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
  if redis.call('HINCRBY', rec, 'attempts', 1) == 1 then
    -- The first attempt happened: the call's next event may start now.
    local nxt = redis.call('HGET', rec, 'next')
    if nxt and nxt ~= '' then
      local nrec = prefix .. ':d:' .. nxt
      if redis.call('HGET', nrec, 'state') == 'waiting' then
        redis.call('HSET', nrec, 'state', 'pending')
        redis.call('ZADD', due, now, nxt)
      end
      redis.call('ZREM', parked, nxt)
      redis.call('HSET', rec, 'next', '')
    end
  end
  if outcome == 'success' then
    redis.call('HSET', rec, 'state', 'delivered', 'delivered_ms', now)
    redis.call('PEXPIRE', rec, retention)
    release_chain()
    window_add(true)
    redis.call('HSET', endpoint, 'failures', 0, 'conn_failures', 0, 'open_until', 0, 'opens', 0)
    return outcome
  end
  if kind == 'paced' then
    -- 429 with Retry-After: the endpoint asks us to slow down, it is not down. Until
    -- the time given it gets half its requests at once (this delivery itself waits
    -- for it); the breaker is not involved.
    local until_ms = now + pace
    if until_ms > tonumber(redis.call('HGET', endpoint, 'paced_until') or '0') then
      redis.call('HSET', endpoint, 'paced_until', until_ms)
    end
  else
    -- A failed attempt counts towards the breaker: a failure ratio over a recent
    -- window (a flaky endpoint that mostly works is not down), or consecutive
    -- connection failures (nothing listens there).
    redis.call('HINCRBY', endpoint, 'failures', 1)
    local conn = 0
    if kind == 'conn' then
      conn = redis.call('HINCRBY', endpoint, 'conn_failures', 1)
    else
      redis.call('HSET', endpoint, 'conn_failures', 0)
    end
    local fails, total = window_add(false)
    local open_until = tonumber(redis.call('HGET', endpoint, 'open_until') or '0')
    local down = conn >= threshold or (total >= min_attempts and fails >= ratio * total)
    -- Open (or, after a failed half-open probe, reopen) unless already open:
    -- failures of requests in flight when it opened must not stretch the pause.
    if open_until <= now and (down or open_until > 0) then
      local opens = redis.call('HINCRBY', endpoint, 'opens', 1)
      local pause = math.min(cooloff * 2 ^ (opens - 1), cooloff_max)
      redis.call('HSET', endpoint, 'open_until', now + pause)
    end
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
  out[#out + 1] = complete(KEYS[6 + j], o[1], o[2], o[3], tonumber(o[4]), o[5],
                           o[6] or 'fail', tonumber(o[7] or '0'))
end
return out
