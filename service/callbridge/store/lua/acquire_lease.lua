-- acquire_lease.lua: take a batch lease that is free, or that this replica's
-- previous process left behind (killed before it could release it).
--
-- KEYS[1] lease    string: token of the owning replica, with a TTL
-- ARGV[1] token    the caller's token, "<replica id>:<process part>"
-- ARGV[2] ttl_ms   the lease's TTL
-- ARGV[3] replica  "<replica id>:", the prefix of every token of this replica
--
-- Reply: 1 when the lease is now the caller's, 0 when another replica holds it.
local current = redis.call('GET', KEYS[1])
-- Ours only when the rest of the token is a process part (no ':'): replica "a" must
-- not take the leases of replica "a:x".
local ours = current and string.sub(current, 1, #ARGV[3]) == ARGV[3]
  and not string.find(current, ':', #ARGV[3] + 1, true)
if current and current ~= ARGV[1] and not ours then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
