-- heartbeat.lua: record that a replica is alive, by the server's clock.
--
-- KEYS[1] replicas  zset: replica id -> last heartbeat (server ms)
-- ARGV[1] replica_id
-- ARGV[2] ttl_ms    a replica is alive while its last heartbeat is this recent
--
-- Reply: the number of live replicas, this one included. Replicas silent for ten
-- TTLs are removed for good.
--#include now
redis.call('ZADD', KEYS[1], now, ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 10 * ttl)
return redis.call('ZCOUNT', KEYS[1], now - ttl, '+inf')
