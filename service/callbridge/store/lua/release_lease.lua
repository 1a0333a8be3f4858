-- release_lease.lua: give a batch lease back, only if the caller holds it.
--
-- KEYS[1] lease   string: token of the owning replica
-- ARGV[1] token   the caller's token
--
-- Reply: 1 when deleted, 0 when it was not ours (nothing changed).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
