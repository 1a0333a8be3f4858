-- presence.lua: one process's beat under its replica id, and whether another live
-- process uses the same id (by the server's clock).
--
-- KEYS[1] procs      hash: "<replica id>|<nonce>" -> "<first beat ms>|<last beat ms>"
-- ARGV[1] replica    the replica id (server.replica_id; never holds '|')
-- ARGV[2] nonce      this process's own, drawn at its start
-- ARGV[3] window_ms  a process is live while its last beat is this recent
--
-- Reply: {conflict, other_first_ms, own_first_ms, other_last_ms, now_ms}: conflict is
-- 1 when another process under this replica id beat after this one's first beat (both
-- are live), with that process's first beat; other_last_ms is the last beat of the
-- freshest other process under this id (0: none). Entries silent for ten windows are
-- dropped, whatever their replica.
--#include now
local me = ARGV[1] .. '|' .. ARGV[2]
local prefix = ARGV[1] .. '|'
local window = tonumber(ARGV[3])
local mine = redis.call('HGET', KEYS[1], me)
local first = now
if mine then
  first = tonumber(string.match(mine, '^(%d+)|')) or now
end
redis.call('HSET', KEYS[1], me, first .. '|' .. now)
local conflict, other_first, other_last = 0, 0, 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local field = entries[i]
  local f, l = string.match(entries[i + 1], '^(%d+)|(%d+)$')
  f, l = tonumber(f) or 0, tonumber(l) or 0
  if l < now - 10 * window then
    redis.call('HDEL', KEYS[1], field)
  elseif field ~= me and string.sub(field, 1, #prefix) == prefix then
    if l > other_last then other_last = l end
    if l > first then
      conflict, other_first = 1, f
    end
  end
end
return {conflict, other_first, first, other_last, now}
