-- sweep.lua: give back claims whose visibility deadline passed (their worker died),
-- forget dead letters whose record has expired, and release parked deliveries whose
-- predecessor has had its first attempt (a safety net: the release normally happens
-- in the outcome script, but a replica of the previous release, during a rolling
-- upgrade, does not know about parking).
--
-- KEYS[1] due  KEYS[2] inflight  KEYS[3] dead  KEYS[4] parked (optional)
-- KEYS[5] endpoint (optional)  hash: its `parked_cursor` is where the next look at the
--                               parked set starts (without it: the oldest, as before)
--
-- ARGV[1] prefix             the prefix of the delivery record keys: prefix .. <id> (`Keys.record_prefix`)
-- ARGV[2] max                at most this many claims given back per call
-- ARGV[3] dead_retention_ms  dead letters older than this are dropped from the index
--
-- Reply: how many claims were given back.
--#include now
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[3]))
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  local rec = ARGV[1] .. id
  if redis.call('EXISTS', rec) == 1 then
    redis.call('HSET', rec, 'state', 'pending', 'claim', '')
    redis.call('ZADD', KEYS[1], now, id)
  end
end
if KEYS[4] then
  -- A few parked deliveries per call (O(1) work per sweep), from a cursor that walks
  -- the whole set round after round: from the oldest each time, one stuck behind 20
  -- rightly waiting ones was never looked at. A rank, not a score: one enqueue parks
  -- many with the same score. Ranks shift as others come and go; the walk only has
  -- to reach every member eventually.
  local cursor = 0
  if KEYS[5] then cursor = tonumber(redis.call('HGET', KEYS[5], 'parked_cursor') or '0') end
  local page = redis.call('ZRANGE', KEYS[4], cursor, cursor + 19)
  local freed = 0
  for _, id in ipairs(page) do
    local rec = ARGV[1] .. id
    local f = redis.call('HMGET', rec, 'state', 'prev')
    local free = f[1] ~= 'waiting'
    if not free then
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
    local nxt = cursor + #page - freed
    if #page < 20 then nxt = 0 end  -- the end of the set: start over
    redis.call('HSET', KEYS[5], 'parked_cursor', nxt)
  end
end
return #ids
