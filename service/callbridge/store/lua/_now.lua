-- _now.lua: shared snippet, included with `--#include now`.
-- The Redis server's clock, so every replica agrees on what is due whatever its
-- own clock says: `now_exact` in fractional milliseconds, `now` in whole ones.
local now_parts = redis.call('TIME')
local now_exact = tonumber(now_parts[1]) * 1000 + tonumber(now_parts[2]) / 1000
local now = math.floor(now_exact)
