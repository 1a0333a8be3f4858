-- live_replicas.lua: how many replicas heartbeated recently, by the server's clock.
--
-- KEYS[1] replicas  zset: replica id -> last heartbeat (server ms)
-- ARGV[1] ttl_ms    a replica is alive while its last heartbeat is this recent
--
-- Reply: the number of live replicas.
--#include now
return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')
