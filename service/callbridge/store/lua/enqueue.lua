-- enqueue.lua: add deliveries of committed events to one subscription's queue.
-- Idempotent: a delivery that exists (pending, delivered or dead) is left alone,
-- because the relay may run again over the same outbox entries after a crash.
--
-- KEYS[1] due      zset: delivery id -> due time (ms)
-- KEYS[2] chain    hash: call key -> last event id enqueued for that call
-- KEYS[2+j] record hash: the j-th delivery (one key per event)
--
-- ARGV: five per event, in KEYS order:
--   call key ('' for batch events: unordered), event id, event type, body,
--   observed_ms (when the change was committed)
--
-- Reply: how many deliveries were created.
--#include now
local due, chain = KEYS[1], KEYS[2]
local added = 0
local n = (#ARGV) / 5
for j = 0, n - 1 do
  local rec = KEYS[3 + j]
  local callkey, id, etype, body, observed = ARGV[j*5+1], ARGV[j*5+2], ARGV[j*5+3],
                                             ARGV[j*5+4], ARGV[j*5+5]
  if redis.call('EXISTS', rec) == 0 then
    local prev = ''
    if callkey ~= '' then
      prev = redis.call('HGET', chain, callkey) or ''
      redis.call('HSET', chain, callkey, id)
    end
    redis.call('HSET', rec, 'body', body, 'type', etype, 'state', 'pending', 'attempts', 0,
               'created_ms', now, 'observed_ms', observed, 'prev', prev, 'callkey', callkey,
               'history', '[]')
    redis.call('ZADD', due, now, id)
    added = added + 1
  end
end
return added
