-- requeue.lua: make a dead or delivered delivery due again now (replay, redeliver).
--
-- KEYS[1] due  KEYS[2] dead  KEYS[3] record  KEYS[4] parked
--
-- ARGV[1] event id
-- ARGV[2] reset_attempts  '1' gives the delivery a fresh retry schedule
--
-- Reply: 1 when requeued, 0 when there is no record or it is in flight.
--#include now
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return 0 end
if state == 'inflight' then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('PERSIST', KEYS[3])
redis.call('HSET', KEYS[3], 'state', 'pending', 'prev', '')
if ARGV[2] == '1' then redis.call('HSET', KEYS[3], 'attempts', 0) end
redis.call('ZADD', KEYS[1], now, ARGV[1])
return 1
