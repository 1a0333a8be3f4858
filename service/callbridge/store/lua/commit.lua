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
-- ARGV[5] commit_id         unique per cycle: a call re-sent by the client after a
--                           lost reply finds it recorded and changes nothing
-- ARGV[6] JSON [call_id, packed state, call_id, packed state, ...]
-- ARGV[7] JSON [event id, type, call_id ('' for batch events), body, ...]
-- ARGV[8] JSON [call_id, entry, ...]: each entry the JSON text
--         [at_ms, status, sequence, event type or null], appended to the call's list
-- ARGV[9] JSON {meta field: value}
-- ARGV[10] (optional: tracing on) JSON [trace context per event, in ARGV[7]'s order],
--         stored as the entry's `trace` field ('' stores none)
-- (One packed argument per section: packing tens of thousands of separate
-- arguments cost the client more CPU than the whole script costs the server; so did
-- the bodies as separate arguments even with hiredis packing them.)
--
-- Reply: {new_version, outbox stream id of each event in order}, or
-- {version, 'replayed'} when this commit_id was already written (the caller then
-- fans out from the outbox: the stream ids of the first reply are lost).
-- Errors: 'FENCED ...' when the lease is not ours; 'CONFLICT ...' when the
-- snapshot version moved (another writer); nothing is written in either case.
local lease, meta, calls, outbox, timeline = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local last = redis.call('HMGET', meta, 'commit_id', 'version')
if last[1] == ARGV[5] then
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
local states, events = cjson.decode(ARGV[6]), cjson.decode(ARGV[7])
local tl, meta_fields = cjson.decode(ARGV[8]), cjson.decode(ARGV[9])
-- HSET in chunks: Lua's unpack has a stack limit.
for s = 1, #states, 1000 do
  redis.call('HSET', calls, unpack(states, s, math.min(s + 999, #states)))
end
local stream_ids = {}
local traces = ARGV[10] and cjson.decode(ARGV[10])
for e = 1, #events, 4 do
  local trace = traces and traces[(e + 3) / 4] or ''
  if trace ~= '' then
    stream_ids[#stream_ids + 1] = redis.call('XADD', outbox, '*', 'id', events[e], 'type',
                                             events[e + 1], 'call', events[e + 2],
                                             'body', events[e + 3], 'trace', trace)
  else
    stream_ids[#stream_ids + 1] = redis.call('XADD', outbox, '*', 'id', events[e], 'type',
                                             events[e + 1], 'call', events[e + 2],
                                             'body', events[e + 3])
  end
end
for e = 1, #tl, 2 do
  local call_id, entry = tl[e], tl[e + 1]
  local old = redis.call('HGET', timeline, call_id)
  local new
  if not old or string.sub(old, 1, 1) ~= '[' or string.sub(old, -1) ~= ']'
     or old == '[]' then
    new = '[' .. entry .. ']'
  else
    -- Entries are JSON arrays written without spaces, so '],[' separates them; a
    -- status holding '],[' only makes the count high, and the exact path below runs.
    local _, seps = string.gsub(old, '%],%[', '')
    if seps + 1 < tl_max then
      -- Appended as text: no decoding and re-encoding of the list per change.
      new = string.sub(old, 1, -2) .. ',' .. entry .. ']'
    else
      local list = cjson.decode(old)
      list[#list + 1] = cjson.decode(entry)
      while #list > tl_max do table.remove(list, 1) end
      new = cjson.encode(list)
    end
  end
  redis.call('HSET', timeline, call_id, new)
end
local flat = {}
for name, value in pairs(meta_fields) do
  flat[#flat + 1] = name; flat[#flat + 1] = value
end
if #flat > 0 then redis.call('HSET', meta, unpack(flat)) end
if #states > 0 or #events > 0 then
  version = version + 1
  redis.call('HSET', meta, 'version', version)
end
redis.call('HSET', meta, 'commit_id', ARGV[5])
redis.call('PEXPIRE', lease, ttl_ms)
-- A batch watched again after it was retired (or removed) still has the expiry set
-- then: a polled batch's state must never expire under it, nor its outbox (XADD
-- keeps the stream's expiry: events committed into it would vanish with it).
redis.call('PERSIST', calls)
redis.call('PERSIST', meta)
redis.call('PERSIST', timeline)
redis.call('PERSIST', outbox)
-- The outbox ids let the caller fan out from memory and trim exactly these entries.
table.insert(stream_ids, 1, version)
return stream_ids
