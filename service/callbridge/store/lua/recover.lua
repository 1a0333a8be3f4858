-- recover.lua: one step of an operator's recovery job: re-send every event of a time
-- window that a subscription did not get a 2xx for (dead letters, and deliveries
-- waiting for a later retry). Each step takes a page off the job's own lists (copied
-- when it started, start_recover.lua) in the same atomic step as its requeues, so a
-- job killed at any point resumes where it was and never re-sends a delivery twice.
--
-- KEYS[1] due   KEYS[2] dead   KEYS[3] job (hash)   KEYS[4] job_dead   KEYS[5] job_due
-- KEYS[6] parked   KEYS[7] inflight   (the subscription's, for its backlog)
--
-- ARGV[1] prefix     the prefix of the delivery record keys: prefix .. <id>
-- ARGV[2] page       entries taken per step at most
-- ARGV[3] ready_max  no step while more deliveries than this are due now (the job
--                    feeds the queue at the pace the endpoint takes it, so new events
--                    are not stuck behind a whole window of old ones)
-- ARGV[4] keep_ms    how long a finished job is kept
-- ARGV[5] max_backlog  phase 'dead' makes no more letters due than leave the
--                    subscription's undelivered deliveries (due, parked, in flight)
--                    under this bound; it waits while they are at it (0: no bound)
--
-- Job fields: since_ms, until_ms (0: open), created_ms, phase ('dead', then 'due', then
-- 'done'), total (entries to look at), scanned, requeued, state ('running' | 'done'),
-- finished_ms, scope ('all', absent from a previous release's jobs; or 'dead').
--
-- Phase 'dead': each dead letter whose event was committed in the window is due again
-- at once with a fresh retry schedule (scope 'dead': each one on the job's list, which
-- is what was dead when it started; the window is only its name). Phase 'due' (scope
-- 'all' only): each delivery waiting for a retry after a failure before the job began,
-- whose event is in the window, is due at once. Both are due at their commit time:
-- oldest event first, ahead of newer ones. Delivered ones, and letters requeued
-- meanwhile, are skipped (the state is read here, in the same step).
--
-- Reply: {phase after the step ('dead' | 'due' | 'done' | 'gone' | 'waiting'), requeued}
--#include now
local due, dead, job, prefix = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local page, ready_max, keep = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local bound = tonumber(ARGV[5] or '0')
local j = redis.call('HMGET', job, 'since_ms', 'until_ms', 'created_ms', 'phase', 'scope')
if not j[1] then return {'gone', 0} end
local phase = j[4] or 'dead'
local windowed = (j[5] or 'all') ~= 'dead'
if phase == 'done' then return {'done', 0} end
if redis.call('ZCOUNT', due, '-inf', now) > ready_max then return {'waiting', 0} end
if phase == 'dead' and bound > 0 then
  local room = bound - redis.call('ZCARD', due) - redis.call('ZCARD', KEYS[6])
               - redis.call('ZCARD', KEYS[7])
  if room <= 0 then return {'waiting', 0} end
  page = math.min(page, room)
end
local since, upto, created = tonumber(j[1]), tonumber(j[2] or '0'), tonumber(j[3])
local list = phase == 'dead' and KEYS[4] or KEYS[5]
local taken = redis.call('ZPOPMIN', list, page)
local requeued = 0
for i = 1, #taken, 2 do
  local id = taken[i]
  local rec = prefix .. id
  local f = redis.call('HMGET', rec, 'state', 'observed_ms', 'failed_ms')
  local observed = tonumber(f[2] or '-1')
  if not windowed or (observed >= since and (upto <= 0 or observed < upto)) then
    if phase == 'dead' then
      if f[1] == 'dead' then
        redis.call('ZREM', dead, id)
        redis.call('PERSIST', rec)
        redis.call('HSET', rec, 'state', 'pending', 'attempts', 0, 'prev', '', 'claim', '')
        -- Its batch's count (enqueue.lua) took its first attempt already: not again.
        redis.call('HDEL', rec, 'gate')
        redis.call('ZADD', due, observed, id)
        requeued = requeued + 1
      end
    elseif f[1] == 'pending' and tonumber(f[3] or '0') > 0 and tonumber(f[3]) < created then
      if redis.call('ZADD', due, 'XX', 'CH', observed, id) == 1 then
        requeued = requeued + 1
      end
    end
  end
end
redis.call('HINCRBY', job, 'scanned', #taken / 2)
redis.call('HINCRBY', job, 'requeued', requeued)
local nxt = phase
if redis.call('EXISTS', list) == 0 then
  nxt = (phase == 'dead' and windowed) and 'due' or 'done'
end
if nxt == 'done' then
  redis.call('HSET', job, 'phase', 'done', 'state', 'done', 'finished_ms', now)
  redis.call('PEXPIRE', job, keep)
elseif nxt ~= phase then
  redis.call('HSET', job, 'phase', nxt)
end
return {nxt, requeued}
