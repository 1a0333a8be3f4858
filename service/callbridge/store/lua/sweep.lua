-- sweep.lua: give back claims whose visibility deadline passed (their worker died),
-- and forget dead letters whose record has expired.
--
-- KEYS[1] due  KEYS[2] inflight  KEYS[3] dead
--
-- ARGV[1] prefix             the subscription's key prefix (records are prefix:d:<id>)
-- ARGV[2] max                at most this many claims given back per call
-- ARGV[3] dead_retention_ms  dead letters older than this are dropped from the index
--
-- Reply: how many claims were given back.
--#include now
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[3]))
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[2], id)
  local rec = ARGV[1] .. ':d:' .. id
  if redis.call('EXISTS', rec) == 1 then
    redis.call('HSET', rec, 'state', 'pending', 'claim', '')
    redis.call('ZADD', KEYS[1], now, id)
  end
end
return #ids
