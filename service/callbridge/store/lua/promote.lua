-- promote.lua: after an endpoint recovered (a probe succeeded, see _outcomes.lua), make
-- every delivery that failed during its failure streak due now, in event order, a page
-- at a time (the deliverer calls again until done).
--
-- KEYS[1] due       zset: delivery id -> due time (ms)
-- KEYS[2] endpoint  hash: promote_from (ms: the streak's start; absent when nothing is
--                   to promote), promote_cursor (the due score this pass has reached,
--                   exclusive: '(' .. ms)
--
-- ARGV[1] prefix    the prefix of the delivery record keys: prefix .. <id>
-- ARGV[2] page      at most this many due entries looked at per call
--
-- A delivery is promoted when it is scheduled later than now and its last failure
-- (`failed_ms`) is at or after promote_from: a retry the streak caused. Its new due
-- time is when its event was committed (`observed_ms`, in the past): promoted
-- deliveries go first, oldest event first, before deliveries enqueued since. Those
-- that failed before the streak (a flaky endpoint's ordinary retries) keep theirs.
--
-- Reply: {promoted, done}: done is 1 once the whole due set was looked at (the
-- endpoint's promote_* fields are then removed).
--#include now
local due, endpoint, prefix = KEYS[1], KEYS[2], ARGV[1]
local page = tonumber(ARGV[2])
local st = redis.call('HMGET', endpoint, 'promote_from', 'promote_cursor')
local from = tonumber(st[1] or '0')
if from <= 0 then return {0, 1} end
local cursor = st[2] or ('(' .. now)
local rows = redis.call('ZRANGEBYSCORE', due, cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, page)
local promoted, last, seen = 0, nil, {}
local function look(id)
  if seen[id] then return end
  seen[id] = true
  local f = redis.call('HMGET', prefix .. id, 'failed_ms', 'observed_ms', 'state')
  if f[3] == 'pending' and tonumber(f[1] or '0') >= from then
    redis.call('ZADD', due, 'XX', tonumber(f[2] or '0'), id)
    promoted = promoted + 1
  end
end
for i = 1, #rows, 2 do
  look(rows[i])
  last = rows[i + 1]
end
if #rows < 2 * page then
  redis.call('HDEL', endpoint, 'promote_from', 'promote_cursor')
  return {promoted, 1}
end
-- Entries sharing the last score may lie beyond the page: take them all now, so an
-- exclusive cursor skips none.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', due, last, last)) do look(id) end
redis.call('HSET', endpoint, 'promote_cursor', '(' .. last)
return {promoted, 0}
