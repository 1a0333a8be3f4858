-- enqueue.lua: add deliveries of committed events to one subscription's queue.
-- Idempotent: a delivery that exists (pending, delivered or dead) is left alone,
-- because the relay may run again over the same outbox entries after a crash.
--
-- KEYS[1] due      zset: delivery id -> due time (ms)
-- KEYS[2] chain    hash: call key -> last event id enqueued for that call
-- KEYS[3] parked   zset: deliveries waiting for their predecessor's first attempt
-- KEYS[4] inflight zset: claimed deliveries   KEYS[5] dead  zset: dead letters
-- KEYS[6] ops      stream: operational events (a dead letter for a full backlog)
-- (The records, prefix .. <id>, share the subscription's hash slot through the
-- prefix's tag, as in claim.lua; naming each one cost the client a key per event.)
--
-- ARGV[1] prefix   the prefix of the delivery record keys: prefix .. <id> (`Keys.record_prefix`)
-- ARGV[2] max_backlog        deliveries a subscription may hold undelivered
-- ARGV[3] dead_retention_ms  how long a dead letter is kept
-- then seven per event, in KEYS order:
--   call key ('' for batch events), event id, event type, body,
--   observed_ms (when the change was committed), batch id ('' for operational events),
--   trace context ('' for none: tracing off; stored as the record's `trace` field,
--   which claim.lua hands back)
--
-- Per-call order: a delivery whose call's previous event has not had its first
-- attempt yet is parked (state 'waiting', not due) and named in the predecessor's
-- 'next' field; complete.lua releases it after that first attempt. So the due set
-- only ever holds deliveries that may start, and none can hide another.
--
-- Per-batch order: a batch event (batch.completed, batch.retired) waits until every
-- call event of its batch enqueued before it has had its first attempt. The chain
-- hash counts them per batch (field '#' .. batch: call deliveries without a first
-- attempt; the record's `gate` names the batch it counts in) and lists the batch
-- events waiting ('=' .. batch: a JSON list of ids; the record's `hold` names the
-- batch). Batch ids never contain '/', '#' or '=' (config), call keys always hold a
-- '/': the fields cannot meet. complete() counts down and releases them at 0; the
-- sweep frees one held past its bound (a count a previous release never decremented).
--
-- Backlog: a subscription holding max_backlog undelivered deliveries (an endpoint
-- down or disabled for long) gets further ones as dead letters at once ('backlog
-- full'): Redis stays bounded, and each one stays visible and replayable for the
-- dead-letter retention.
--
-- Reply: {deliveries created, of which dead-lettered because the backlog was full}.
--#include now
local due, chain, parked, inflight, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix = ARGV[1]
local max_backlog, dead_retention = tonumber(ARGV[2]), tonumber(ARGV[3])
local backlog = redis.call('ZCARD', due) + redis.call('ZCARD', parked)
                + redis.call('ZCARD', inflight)
local added, overflow = 0, 0
local n = (#ARGV - 3) / 7
-- The chain entries of every call named, read in one call (in slices: unpack() takes a
-- few thousand values at most); the new ones, and the due and parked sets, are written
-- once at the end. Per event that leaves the EXISTS and the record's HSET.
local last, callkeys = {}, {}
for j = 0, n - 1 do
  local callkey = ARGV[4 + j * 7]
  if callkey ~= '' and last[callkey] == nil then
    last[callkey] = false
    callkeys[#callkeys + 1] = callkey
  end
end
for i = 1, #callkeys, 1000 do
  local upto = math.min(i + 999, #callkeys)
  local got = redis.call('HMGET', chain, unpack(callkeys, i, upto))
  for k = i, upto do last[callkeys[k]] = got[k - i + 1] or '' end
end
local chained, to_due, to_park = {}, {}, {}
-- Per batch: call deliveries added now (counted once at the end), batch events held.
local gated, held, batches = {}, {}, {}
local function batch_seen(b)
  if gated[b] == nil then
    gated[b], held[b] = 0, {}
    batches[#batches + 1] = b
  end
end
local function add_all(cmd, key, pairs)
  for i = 1, #pairs, 1000 do
    redis.call(cmd, key, unpack(pairs, i, math.min(i + 999, #pairs)))
  end
end
for j = 0, n - 1 do
  local a = 3 + j * 7
  local callkey, id, etype, body, observed = ARGV[a+1], ARGV[a+2], ARGV[a+3], ARGV[a+4],
                                             ARGV[a+5]
  local batch, trace = ARGV[a+6], ARGV[a+7]
  local rec = prefix .. id
  local exists = redis.call('EXISTS', rec) == 1
  if not exists and backlog >= max_backlog then
    local entry = cjson.encode({at_ms = now, error = 'backlog full', outcome = 'dead'})
    redis.call('HSET', rec, 'body', body, 'type', etype, 'state', 'dead', 'attempts', 0,
               'created_ms', now, 'observed_ms', observed, 'prev', '', 'callkey', callkey,
               'history', '[' .. entry .. ']', 'dead_ms', now)
    if trace ~= '' then redis.call('HSET', rec, 'trace', trace) end
    redis.call('ZADD', dead, now, id)
    redis.call('PEXPIRE', rec, dead_retention)
    if KEYS[6] then
      redis.call('XADD', KEYS[6], 'MAXLEN', '~', 10000, '*', 'type', 'delivery.dead_lettered',
                 'at', now, 'event_id', id, 'event_type', etype, 'attempts', 0,
                 'last_error', 'backlog full')
    end
    added, overflow = added + 1, overflow + 1
  elseif not exists then
    local prev = ''
    if callkey ~= '' then
      prev = last[callkey]
      last[callkey] = id
      chained[#chained + 1] = callkey
      chained[#chained + 1] = id
    end
    local state = 'pending'
    if prev ~= '' then
      local prec = prefix .. prev
      local p = redis.call('HMGET', prec, 'state', 'attempts')
      if p[2] == '0' and (p[1] == 'pending' or p[1] == 'inflight' or p[1] == 'waiting') then
        state = 'waiting'
        redis.call('HSET', prec, 'next', id)
      end
    end
    local extra = {}
    if batch ~= '' then
      batch_seen(batch)
      if callkey ~= '' then
        gated[batch] = gated[batch] + 1
        extra = {'gate', batch}
      elseif gated[batch] + tonumber(redis.call('HGET', chain, '#' .. batch) or '0') > 0 then
        state = 'waiting'
        local h = held[batch]
        h[#h + 1] = id
        extra = {'hold', batch}
      end
    end
    redis.call('HSET', rec, 'body', body, 'type', etype, 'state', state, 'attempts', 0,
               'created_ms', now, 'observed_ms', observed, 'prev', prev, 'callkey', callkey,
               'history', '[]', unpack(extra))
    if trace ~= '' then redis.call('HSET', rec, 'trace', trace) end
    local into = state == 'waiting' and to_park or to_due
    into[#into + 1] = now
    into[#into + 1] = id
    added, backlog = added + 1, backlog + 1
  end
end
-- A call named twice sets its entry twice, the later event last: HSET keeps that one.
add_all('HSET', chain, chained)
add_all('ZADD', due, to_due)
add_all('ZADD', parked, to_park)
for _, b in ipairs(batches) do
  if gated[b] > 0 then redis.call('HINCRBY', chain, '#' .. b, gated[b]) end
  if #held[b] > 0 then
    local w = cjson.decode(redis.call('HGET', chain, '=' .. b) or '[]')
    for _, id in ipairs(held[b]) do w[#w + 1] = id end
    redis.call('HSET', chain, '=' .. b, cjson.encode(w))
  end
end
return {added, overflow}
