-- requeue.lua: make a dead or delivered delivery due again now (replay, redeliver).
--
-- KEYS[1] due  KEYS[2] dead  KEYS[3] record  KEYS[4] parked
-- KEYS[5] inflight (optional, with ARGV[4] > 0)
--
-- ARGV[1] event id
-- ARGV[2] reset_attempts  '1' gives the delivery a fresh retry schedule
-- ARGV[3] only (optional) 'dead': requeue a dead letter only (replay): the state is
--                         read here, in the same step, so a delivery delivered a
--                         moment ago is not sent again; absent or '': dead or delivered
-- ARGV[4] max_backlog (optional)  nothing is requeued while the subscription holds
--                         this many undelivered deliveries (due, parked, in flight);
--                         absent or 0: no bound
--
-- Reply: 1 when requeued; 0 when there is no record, it is in flight, or it is not in
-- the state asked for; 2 when it is due or waiting for its turn already: left as it is
-- (resetting its attempts would let a failing delivery retry for ever, and clearing
-- its `prev` would let it overtake the call's earlier event); -1 when the backlog is
-- full.
--#include now
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return 0 end
if state == 'inflight' then return 0 end
if state == 'pending' or state == 'waiting' then return 2 end
if ARGV[3] == 'dead' and state ~= 'dead' then return 0 end
if KEYS[5] and tonumber(ARGV[4] or '0') > 0 then
  local backlog = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[4])
                  + redis.call('ZCARD', KEYS[5])
  if backlog >= tonumber(ARGV[4]) then return -1 end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('PERSIST', KEYS[3])
redis.call('HSET', KEYS[3], 'state', 'pending', 'prev', '')
-- Its batch's count (enqueue.lua) took its first attempt already: not again.
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[3], 'attempts', 0)
  redis.call('HDEL', KEYS[3], 'gate')
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
