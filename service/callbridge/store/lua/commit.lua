-- commit.lua: write one poll cycle of a batch atomically, fenced by the batch lease.
--
-- KEYS[1] lease     string: token of the owning replica
-- KEYS[2] meta      hash: batch metadata; field `version` counts commits
-- KEYS[3] calls     hash: call_id -> packed CallState (the snapshot)
-- KEYS[4] outbox    stream: committed events not yet fanned out
-- KEYS[5] timeline  hash: call_id -> JSON list of recent observations
--
-- ARGV[1] token             the caller's lease token
-- ARGV[2] expected_version  the meta version the caller diffed against
-- ARGV[3] lease_ttl_ms      the lease is renewed to this TTL on success
-- ARGV[4] timeline_max      entries kept per call in the timeline
-- ARGV[5] n_states  ARGV[6] n_events  ARGV[7] n_timeline  ARGV[8] n_meta
-- ARGV[9] commit_id         unique per cycle: a call re-sent by the client after a
--                           lost reply finds it recorded and changes nothing
-- then, in this order:
--   n_states   pairs   call_id, packed state
--   n_events   quads   event id, event type, call_id ('' for batch events), body
--   n_timeline pairs   call_id, JSON timeline entry
--   n_meta     pairs   meta field, value
--
-- Reply: {new_version, outbox stream id of each event in order}, or
-- {version, 'replayed'} when this commit_id was already written (the caller then
-- fans out from the outbox: the stream ids of the first reply are lost).
-- Errors: 'FENCED ...' when the lease is not ours; 'CONFLICT ...' when the
-- snapshot version moved (another writer); nothing is written in either case.
local lease, meta, calls, outbox, timeline = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local last = redis.call('HMGET', meta, 'commit_id', 'version')
if last[1] == ARGV[9] then
  return {tonumber(last[2] or '0'), 'replayed'}
end
if redis.call('GET', lease) ~= ARGV[1] then
  return redis.error_reply('FENCED lease lost')
end
local version = tonumber(redis.call('HGET', meta, 'version') or '0')
if version ~= tonumber(ARGV[2]) then
  return redis.error_reply('CONFLICT snapshot version is ' .. version)
end
local ttl_ms, tl_max = tonumber(ARGV[3]), tonumber(ARGV[4])
local n_states, n_events = tonumber(ARGV[5]), tonumber(ARGV[6])
local n_tl, n_meta = tonumber(ARGV[7]), tonumber(ARGV[8])
local i = 10
-- HSET in chunks: Lua's unpack has a stack limit.
local chunk = {}
for _ = 1, n_states do
  chunk[#chunk + 1] = ARGV[i]; chunk[#chunk + 1] = ARGV[i + 1]; i = i + 2
  if #chunk >= 1000 then redis.call('HSET', calls, unpack(chunk)); chunk = {} end
end
if #chunk > 0 then redis.call('HSET', calls, unpack(chunk)) end
local stream_ids = {}
for _ = 1, n_events do
  stream_ids[#stream_ids + 1] = redis.call('XADD', outbox, '*', 'id', ARGV[i], 'type',
                                           ARGV[i + 1], 'call', ARGV[i + 2], 'body', ARGV[i + 3])
  i = i + 4
end
for _ = 1, n_tl do
  local call_id, entry = ARGV[i], ARGV[i + 1]
  i = i + 2
  local old = redis.call('HGET', timeline, call_id)
  local list = old and cjson.decode(old) or {}
  list[#list + 1] = cjson.decode(entry)
  while #list > tl_max do table.remove(list, 1) end
  redis.call('HSET', timeline, call_id, cjson.encode(list))
end
if n_meta > 0 then
  chunk = {}
  for _ = 1, n_meta do
    chunk[#chunk + 1] = ARGV[i]; chunk[#chunk + 1] = ARGV[i + 1]; i = i + 2
  end
  redis.call('HSET', meta, unpack(chunk))
end
if n_states > 0 or n_events > 0 then
  version = version + 1
  redis.call('HSET', meta, 'version', version)
end
redis.call('HSET', meta, 'commit_id', ARGV[9])
redis.call('PEXPIRE', lease, ttl_ms)
-- A batch watched again after it was retired still has the expiry set then:
-- a polled batch's state must never expire under it.
redis.call('PERSIST', calls)
redis.call('PERSIST', meta)
redis.call('PERSIST', timeline)
-- The outbox ids let the caller fan out from memory and trim exactly these entries.
table.insert(stream_ids, 1, version)
return stream_ids
