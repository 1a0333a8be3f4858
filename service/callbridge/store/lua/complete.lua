-- complete.lua: record the outcomes of attempts of one subscription, several at once.
--
-- KEYS[1] due  KEYS[2] inflight  KEYS[3] dead  KEYS[4] endpoint  KEYS[5] chain
-- KEYS[5+j]    record hash of the j-th outcome's delivery
--
-- ARGV[1] retention_ms       delivered records are kept this long
-- ARGV[2] dead_retention_ms  dead letters are kept this long
-- ARGV[3] breaker_threshold  consecutive failures that open the breaker
-- ARGV[4] cooloff_ms  ARGV[5] cooloff_max_ms   breaker pause, doubling per reopen
-- ARGV[6] history_max        attempts kept in a record's history
-- ARGV[7] JSON list of outcomes, in KEYS order:
--         [[event id, claim token, outcome, delay_ms, history entry JSON], ...]
--         outcome: success | retry | dead | disable | release
--
-- Reply: per outcome, what applied: the outcome itself, 'stale' when the claim had
-- expired and moved to another worker (nothing recorded), 'gone' when the record
-- no longer exists.
--#include now
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
