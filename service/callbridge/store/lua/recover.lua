-- recover.lua: one step of an operator's recovery job: re-send every event of a time
-- window that a subscription did not get a 2xx for (dead letters, and deliveries
-- waiting for a later retry). Each step looks at one page and moves the job's cursor
-- in the same atomic step, so a job killed at any point resumes where it was and never
-- re-sends a delivery twice.
--
-- KEYS[1] due   KEYS[2] dead   KEYS[3] job (hash, `Keys.recover_job`)
--
-- ARGV[1] prefix   the prefix of the delivery record keys: prefix .. <id>
-- ARGV[2] page     entries looked at per step at most
-- ARGV[3] ready_max  no step while more deliveries than this are due now (the job
--                  feeds the queue at the pace the endpoint takes it, so new events
--                  are not stuck behind a whole window of old ones)
-- ARGV[4] keep_ms  how long a finished job is kept
--
-- Job fields: since_ms, until_ms (0: open), created_ms (the job only acts on what had
-- failed before it began: a delivery it re-sent that fails again is not re-sent again),
-- phase ('dead', then 'due', then 'done'), cursor (a score, exclusive), scanned,
-- requeued, state ('running' | 'done'), finished_ms.
--
-- Phase 'dead': each dead letter (dead before the job began) whose event was committed
-- in the window is due again at once with a fresh retry schedule. Phase 'due': each
-- delivery waiting for a retry after a failure before the job began, whose event is in
-- the window, is due at once. Both go in event order (due at their commit time).
-- Delivered ones are in neither set: skipped.
--
-- Reply: {phase after the step ('dead' | 'due' | 'done' | 'gone' | 'waiting'), requeued}
--#include now
local due, dead, job, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local page, ready_max, keep = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local j = redis.call('HMGET', job, 'since_ms', 'until_ms', 'created_ms', 'phase', 'cursor')
if not j[1] then return {'gone', 0} end
local phase = j[4] or 'dead'
if phase == 'done' then return {'done', 0} end
if redis.call('ZCOUNT', due, '-inf', now) > ready_max then return {'waiting', 0} end
local since, upto, created = tonumber(j[1]), tonumber(j[2] or '0'), tonumber(j[3])
local function in_window(observed)
  return observed >= since and (upto <= 0 or observed < upto)
end

local requeued, scanned, seen = 0, 0, {}
local function look(id)
  if seen[id] then return end
  seen[id] = true
  scanned = scanned + 1
  local rec = prefix .. id
  local f = redis.call('HMGET', rec, 'state', 'observed_ms', 'failed_ms')
  local observed = tonumber(f[2] or '-1')
  if not in_window(observed) then return end
  if phase == 'dead' then
    if f[1] ~= 'dead' then return end
    redis.call('ZREM', dead, id)
    redis.call('PERSIST', rec)
    redis.call('HSET', rec, 'state', 'pending', 'attempts', 0, 'prev', '', 'claim', '')
    redis.call('ZADD', due, observed, id)
    requeued = requeued + 1
  elseif f[1] == 'pending' and tonumber(f[3] or '0') > 0 and tonumber(f[3]) < created then
    redis.call('ZADD', due, 'XX', observed, id)
    requeued = requeued + 1
  end
end

local set = phase == 'dead' and dead or due
local low = j[5] or (phase == 'dead' and '-inf' or ('(' .. created))
-- Dead letters from before the job; retries scheduled at any time after it began.
local high = phase == 'dead' and created or '+inf'
local rows = redis.call('ZRANGEBYSCORE', set, low, high, 'WITHSCORES', 'LIMIT', 0, page)
local last
for i = 1, #rows, 2 do
  look(rows[i])
  last = rows[i + 1]
end
local nxt, cursor = phase, nil
if #rows < 2 * page then
  nxt = phase == 'dead' and 'due' or 'done'
else
  -- Entries sharing the last score may lie beyond the page: all of them now, so the
  -- exclusive cursor skips none.
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', set, last, last)) do look(id) end
  cursor = '(' .. last
end
redis.call('HINCRBY', job, 'scanned', scanned)
redis.call('HINCRBY', job, 'requeued', requeued)
if nxt == 'done' then
  redis.call('HSET', job, 'phase', 'done', 'state', 'done', 'finished_ms', now)
  redis.call('HDEL', job, 'cursor')
  redis.call('PEXPIRE', job, keep)
elseif nxt ~= phase then
  redis.call('HSET', job, 'phase', nxt)
  redis.call('HDEL', job, 'cursor')
else
  redis.call('HSET', job, 'cursor', cursor)
end
return {nxt, requeued}
