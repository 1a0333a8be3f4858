-- penalize.lua: hand out no upstream request slot for a while (the platform
-- answered 429 with Retry-After): the fleet-wide TAT moves to now + pause.
--
-- KEYS[1] budget    string: TAT in fractional ms
-- ARGV[1] pause_ms  how long no request may start
--
-- Reply: 0.
--#include now
local until_ms = now_exact + tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > tat then
  redis.call('SET', KEYS[1], string.format('%.3f', until_ms), 'PX', tonumber(ARGV[1]) + 1000)
end
return 0
