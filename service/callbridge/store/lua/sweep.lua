-- sweep.lua: give back claims whose visibility deadline passed (their worker died),
-- forget dead letters whose record has expired, and release parked deliveries whose
-- predecessor has had its first attempt (a safety net: the release normally happens
-- in the outcome script, but a replica of the previous release, during a rolling
-- upgrade, does not know about parking).
--
-- KEYS[1] due  KEYS[2] inflight  KEYS[3] dead  KEYS[4] parked (optional)
-- KEYS[5] endpoint (optional)  hash: its `parked_cursor` is where the next look at the
--                               parked set starts (without it: the oldest, as before)
-- KEYS[6] chain  KEYS[7] ops   (as in complete.lua; required with ARGV[4])
--
-- ARGV[1] prefix             the prefix of the delivery record keys: prefix .. <id> (`Keys.record_prefix`)
-- ARGV[2] max                at most this many claims given back per call
-- ARGV[3] dead_retention_ms  dead letters older than this are dropped from the index
--                            (and a claim dead-lettered here is kept this long)
-- ARGV[4] retries (optional) the retry schedule's length: each claim given back is a
--                            failed attempt, dead-lettered once attempts exceed it
--                            (_lost.lua); without it, given back uncounted
-- ARGV[5] history_max (optional, with ARGV[4])  attempts kept in a record's history
-- ARGV[6] hold_max_ms (optional)  a batch event held this long for its batch's call
--                            events (enqueue.lua) is freed anyway (default 10 min)
--
-- Reply: {claims given back, of which dead-lettered}.
--#include now
local due, inflight, dead, parked = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local endpoint, chain, ops, prefix = KEYS[5], KEYS[6], KEYS[7], ARGV[1]
local dead_retention, retries = tonumber(ARGV[3]), tonumber(ARGV[4] or '-1')
local history_max = tonumber(ARGV[5] or '20')
local hold_max = tonumber(ARGV[6] or '600000')
-- The outcome snippet's breaker knobs: a lost claim never reaches them.
local retention, threshold, cooloff, cooloff_max = 0, 0, 0, 0
local ratio, min_attempts, bucket_ms = 1, 0, 1

--#include outcomes
--#include lost

redis.call('ZREMRANGEBYSCORE', dead, '-inf', now - dead_retention)
local ids = redis.call('ZRANGEBYSCORE', inflight, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do give_back(id) end
flush()
if KEYS[4] then
  -- A few parked deliveries per call (O(1) work per sweep), from a cursor that walks
  -- the whole set round after round: from the oldest each time, one stuck behind 20
  -- rightly waiting ones was never looked at. A rank, not a score: one enqueue parks
  -- many with the same score. Ranks shift as others come and go; the walk only has
  -- to reach every member eventually.
  local cursor = 0
  if KEYS[5] then cursor = tonumber(redis.call('HGET', KEYS[5], 'parked_cursor') or '0') end
  local page = redis.call('ZRANGE', KEYS[4], cursor, cursor + 19, 'WITHSCORES')
  local freed, seen = 0, #page / 2
  for i = 1, #page, 2 do
    local id, parked_ms = page[i], tonumber(page[i + 1])
    local rec = ARGV[1] .. id
    local f = redis.call('HMGET', rec, 'state', 'prev', 'hold')
    local free = f[1] ~= 'waiting'
    if not free and f[3] and f[3] ~= '' then
      -- A batch event held for its batch's call events: free once none is left, or
      -- after its bound (a replica of the previous release attempted some without
      -- counting them down: the count never reaches 0).
      local left = tonumber(redis.call('HGET', chain, '#' .. f[3]) or '0')
      free = left <= 0 or now - parked_ms >= hold_max
      if left <= 0 then redis.call('HDEL', chain, '#' .. f[3], '=' .. f[3]) end
    elseif not free then
      local p = redis.call('HMGET', ARGV[1] .. (f[2] or ''), 'state', 'attempts')
      free = not p[1] or p[2] ~= '0' or (p[1] ~= 'pending' and p[1] ~= 'inflight'
                                          and p[1] ~= 'waiting')
    end
    if free then
      redis.call('ZREM', KEYS[4], id)
      freed = freed + 1
      if f[1] == 'waiting' then
        redis.call('HSET', rec, 'state', 'pending')
        redis.call('ZADD', KEYS[1], now, id)
      end
    end
  end
  if KEYS[5] then
    local nxt = cursor + seen - freed
    if seen < 20 then nxt = 0 end  -- the end of the set: start over
    redis.call('HSET', KEYS[5], 'parked_cursor', nxt)
  end
end
return {#ids, lost_dead}
