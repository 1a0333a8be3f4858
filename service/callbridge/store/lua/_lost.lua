-- _lost.lua: shared snippet, included with `--#include lost` (after `now` and
-- `outcomes`, whose locals it shares). `give_back(id)` hands back a claim whose worker
-- never reported (it died, or its attempt crashed before it could): a failed attempt
-- of the delivery like any other, so a payload that kills its worker every time ends
-- as a dead letter after the schedule instead of going round for ever. Expects the
-- local `retries` (the schedule's length: dead once attempts exceed it; -1: claims go
-- back uncounted, as the previous release did).
--
-- Not the endpoint's doing: kind 'lost' leaves the breaker alone, and a lost probe is
-- a plain attempt (its `probing_until` lapses with the claim's deadline).
local lost_error = 'no outcome before the claim was given back: its worker died or '
                   .. 'its attempt crashed'

-- Claims given back as dead letters (their schedule used up), for the caller's reply.
local lost_dead = 0

local function give_back(id)
  local rec = prefix .. id
  redis.call('ZREM', inflight, id)
  local f = redis.call('HMGET', rec, 'state', 'claim', 'attempts')
  if f[1] == 'inflight' and retries >= 0 then
    local outcome = 'retry'
    if tonumber(f[3] or '0') + 1 > retries then
      outcome = 'dead'
      lost_dead = lost_dead + 1
    end
    redis.call('HDEL', rec, 'probe')
    local entry = cjson.encode({at_ms = now, error = lost_error, outcome = outcome})
    complete(rec, id, f[2], outcome, 0, entry, 'lost', 0, 0)
    -- A late answer of that worker reads as stale (its claim moved on), not as what
    -- applied here.
    redis.call('HDEL', rec, 'done', 'done_outcome')
  elseif f[1] == 'inflight' or f[1] == 'pending' then
    redis.call('HSET', rec, 'state', 'pending', 'claim', '')
    redis.call('ZADD', due, now, id)
  end
end
