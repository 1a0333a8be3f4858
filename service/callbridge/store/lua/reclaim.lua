-- reclaim.lua: give back the claims a replica's previous process held when it died
-- (a restarted replica calls it at start, instead of waiting out their deadlines).
--
-- KEYS[1] due  KEYS[2] inflight
-- ARGV[1] prefix     the prefix of the delivery record keys: prefix .. <id> (`Keys.record_prefix`)
-- ARGV[2] replica    "<replica id>:", the start of every claim token of this replica
-- ARGV[3] current    "<replica id>:<this process>:", claims of the running process
--
-- A claim token is "<replica id>:<process>:<call>" (process and call without a colon):
-- only a token whose rest after ARGV[2] is exactly "<process>:<call>" is this
-- replica's. A prefix match alone took replica `a:x`'s live claims for `a`'s.
--
-- Reply: how many claims were given back.
--#include now
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local n = 0
for _, id in ipairs(ids) do
  local rec = ARGV[1] .. id
  local claim = redis.call('HGET', rec, 'claim') or ''
  if string.sub(claim, 1, #ARGV[2]) == ARGV[2] and string.sub(claim, 1, #ARGV[3]) ~= ARGV[3]
     and string.find(string.sub(claim, #ARGV[2] + 1), '^[^:]*:[^:]*$') then
    redis.call('ZREM', KEYS[2], id)
    redis.call('HSET', rec, 'state', 'pending', 'claim', '')
    redis.call('ZADD', KEYS[1], now, id)
    n = n + 1
  end
end
return n
