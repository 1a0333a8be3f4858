-- reclaim.lua: give back the claims a replica's previous process held when it died
-- (a restarted replica calls it at start, instead of waiting out their deadlines).
--
-- KEYS[1] due  KEYS[2] inflight
-- KEYS[3] dead  KEYS[4] parked  KEYS[5] endpoint  KEYS[6] chain  KEYS[7] ops
--                    (as in complete.lua; required with ARGV[4])
-- ARGV[1] prefix     the prefix of the delivery record keys: prefix .. <id> (`Keys.record_prefix`)
-- ARGV[2] replica    "<replica id>:", the start of every claim token of this replica
-- ARGV[3] current    "<replica id>:<this process>:", claims of the running process
-- ARGV[4] retries (optional)  as sweep.lua's: each claim given back is a failed
--                    attempt (_lost.lua); without it, given back uncounted
-- ARGV[5] history_max  ARGV[6] dead_retention_ms   (with ARGV[4])
--
-- A claim token is "<replica id>:<process>:<call>" (process and call without a colon):
-- only a token whose rest after ARGV[2] is exactly "<process>:<call>" is this
-- replica's. A prefix match alone took replica `a:x`'s live claims for `a`'s.
--
-- Reply: {claims given back, of which dead-lettered}.
--#include now
local due, inflight, dead, parked = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local endpoint, chain, ops, prefix = KEYS[5], KEYS[6], KEYS[7], ARGV[1]
local retries, history_max = tonumber(ARGV[4] or '-1'), tonumber(ARGV[5] or '20')
local dead_retention = tonumber(ARGV[6] or '0')
-- The outcome snippet's breaker knobs: a lost claim never reaches them.
local retention, threshold, cooloff, cooloff_max = 0, 0, 0, 0
local ratio, min_attempts, bucket_ms = 1, 0, 1

--#include outcomes
--#include lost

local ids = redis.call('ZRANGE', inflight, 0, -1)
local n = 0
for _, id in ipairs(ids) do
  local claim = redis.call('HGET', prefix .. id, 'claim') or ''
  if string.sub(claim, 1, #ARGV[2]) == ARGV[2] and string.sub(claim, 1, #ARGV[3]) ~= ARGV[3]
     and string.find(string.sub(claim, #ARGV[2] + 1), '^[^:]*:[^:]*$') then
    give_back(id)
    n = n + 1
  end
end
flush()
return {n, lost_dead}
