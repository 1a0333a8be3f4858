-- gcra.lua: reserve n consecutive slots of the fleet-wide upstream request budget.
-- GCRA ("generic cell rate algorithm"): the key holds the theoretical arrival time
-- (TAT, server ms) of the next free slot; reserving n slots moves it n intervals on.
--
-- KEYS[1] budget       string: TAT in fractional ms
-- ARGV[1] interval_ms  time between two slots
-- ARGV[2] n            slots to reserve
--
-- Reply: ms from now until the first reserved slot starts (string, 3 decimals).
--#include now
local interval, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now_exact then tat = now_exact end
local new_tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX',
           math.ceil(new_tat - now_exact + 1000))
return string.format('%.3f', tat - now_exact)
