-- sweep.lua: give back claims whose visibility deadline passed (their worker died),
-- forget dead letters whose record has expired, and release parked deliveries whose
-- predecessor has had its first attempt (a safety net: the release normally happens
-- in the outcome script, but a replica of the previous release, during a rolling
-- upgrade, does not know about parking).
--
-- KEYS[1] due  KEYS[2] inflight  KEYS[3] dead  KEYS[4] parked (optional)
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
  -- The oldest parked deliveries, a few per call: O(1) work per sweep.
  for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, 19)) do
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
      if f[1] == 'waiting' then
        redis.call('HSET', rec, 'state', 'pending')
        redis.call('ZADD', KEYS[1], now, id)
      end
    end
  end
end
return #ids
