-- renew_lease.lua: extend a batch lease, only if the caller still holds it.
--
-- KEYS[1] lease   string: token of the owning replica
-- ARGV[1] token   the caller's token
-- ARGV[2] ttl_ms  the new TTL
--
-- Reply: 1 when renewed, 0 when the lease belongs to someone else or expired.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
