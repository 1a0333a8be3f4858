-- start_recover.lua: create an operator's recovery job unless it exists (the same
-- window asked twice is the same job: its id is derived from it), with the list of
-- what it will look at, taken now: the dead letters, and (scope 'all') the deliveries
-- waiting for a later retry. A delivery that fails after the job began is not the
-- job's business.
--
-- KEYS[1] job   hash (`Keys.recover_job`)   KEYS[2] jobs  zset job id -> created_ms
-- KEYS[3] dead  KEYS[4] due                 (the subscription's)
-- KEYS[5] job_dead  KEYS[6] job_due         zsets: the job's copies of both, by score
--
-- ARGV[1] job id  ARGV[2] since_ms  ARGV[3] until_ms (0: open)  ARGV[4] keep_ms
-- ARGV[5] scope   'all' (a window: dead letters, then waiting retries) or 'dead' (only
--                 the dead letters: the replay of every one); absent: 'all'
--
-- Reply: 1 when created, 0 when the job already existed (left as it is).
--#include now
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local scope = ARGV[5] or 'all'
if scope == '' then scope = 'all' end
local dead = redis.call('ZRANGESTORE', KEYS[5], KEYS[3], '-inf', now, 'BYSCORE')
local later = 0
if scope == 'all' then
  later = redis.call('ZRANGESTORE', KEYS[6], KEYS[4], '(' .. now, '+inf', 'BYSCORE')
end
redis.call('HSET', KEYS[1], 'since_ms', ARGV[2], 'until_ms', ARGV[3], 'created_ms', now,
           'phase', 'dead', 'state', 'running', 'scanned', 0, 'requeued', 0,
           'total', dead + later, 'scope', scope)
redis.call('ZADD', KEYS[2], now, ARGV[1])
-- The index forgets jobs older than the time a finished one is kept.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
return 1
