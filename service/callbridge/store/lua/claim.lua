-- claim.lua: record the outcomes of finished attempts of one subscription, then hand
-- due deliveries to a worker, in one round trip: the slots the outcomes free are
-- claimed again at once.
--
-- KEYS[1] due       zset: delivery id -> due time (ms)
-- KEYS[2] inflight  zset: delivery id -> visibility deadline (ms)
-- KEYS[3] endpoint  hash: disabled, open_until (breaker), paced_until
-- KEYS[4] dead  KEYS[5] chain  KEYS[6] parked   (as in complete.lua; for the outcomes)
-- KEYS[7] receipt   string: the ids this call's token claimed (`Keys.claim_receipt`)
-- KEYS[8] ops       stream: operational events of the subscription (see _outcomes.lua)
--
-- ARGV[1] prefix         the prefix of the delivery record keys: prefix .. <id> (`Keys.record_prefix`)
-- ARGV[2] max_in_flight  fleet-wide cap of claimed deliveries
-- ARGV[3] limit          at most this many claimed now (0: only record the outcomes)
-- ARGV[4] visibility_ms  a claim not completed by now + this is given back by the sweep
-- ARGV[5] token          this claim's token, unique per call: it marks the claimed
--                        records, and a repeated call with the same token (the client
--                        re-sent it after a lost reply) returns the same deliveries
--                        instead of claiming more
-- ARGV[6] outcomes       JSON list of outcomes to record first, '' for none; the same
--                        list and meaning as complete.lua's ARGV[7]
-- ARGV[7..15]            the completion policy, as complete.lua's ARGV[1..6] and [8..10]:
--                        retention_ms, dead_retention_ms, conn_threshold, cooloff_ms,
--                        cooloff_max_ms, history_max, failure_ratio, min_attempts,
--                        window_ms (unused when there are no outcomes)
-- ARGV[16] expire_ms     while the breaker is open, a due delivery created longer ago
--                        than this is dead-lettered without a request (the retry
--                        schedule's span: an endpoint down for longer than it does not
--                        keep deliveries forever); 0: never
-- ARGV[17] detach_ms     a claim older than this no longer counts against
--                        max_in_flight (its request may still run until its deadline:
--                        a hung request must not hold a slot the backlog needs);
--                        0: every claim counts until its outcome
--
-- Reply: {applied, claimed, now}: per outcome what applied (as complete.lua replies), a
-- flat list, five per claimed delivery: id, attempts so far, body, observed_ms, trace
-- context (nil when the record has none: tracing off, or a previous release), and,
-- when something was claimed, the Redis time of the claim (ms; observed_ms is on the
-- same clock, so the delivery lag never mixes it with a replica's wall clock). While
-- the breaker is open: {applied, {}, now, deliveries dead-lettered by age}.
-- Nothing is claimed while the endpoint is disabled or its breaker is open; one probe
-- at a time while the breaker is half-open (marked: the record's `probe` holds the
-- claim token, see _outcomes.lua); half of max_in_flight while a 429's Retry-After
-- runs.
-- Idempotent: outcomes by their done markers, claims by the token's receipt.
--#include now
local due, inflight, endpoint = KEYS[1], KEYS[2], KEYS[3]
local dead, chain, parked, ops = KEYS[4], KEYS[5], KEYS[6], KEYS[8]
local prefix = ARGV[1]
local max_in_flight, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local visibility, token = tonumber(ARGV[4]), ARGV[5]
local retention, dead_retention = tonumber(ARGV[7]), tonumber(ARGV[8])
local threshold, cooloff, cooloff_max = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local history_max = tonumber(ARGV[12])
local ratio, min_attempts = tonumber(ARGV[13]), tonumber(ARGV[14])
local bucket_ms = math.max(1, math.floor(tonumber(ARGV[15]) / 3))
local expire_ms, detach_ms = tonumber(ARGV[16] or '0'), tonumber(ARGV[17] or '0')

--#include outcomes

local applied = {}
if ARGV[6] ~= '' then
  applied = complete_all(cjson.decode(ARGV[6]), function(_, id) return prefix .. id end)
end
local receipt = KEYS[7]
local function reply_for(ids)
  local out = {}
  for _, id in ipairs(ids) do
    local rec = prefix .. id
    local f = redis.call('HMGET', rec, 'attempts', 'body', 'observed_ms', 'claim', 'trace')
    if f[4] == token then
      out[#out + 1] = id; out[#out + 1] = f[1]; out[#out + 1] = f[2]; out[#out + 1] = f[3]
      out[#out + 1] = f[5]
    end
  end
  return out
end
if limit <= 0 then return {applied, {}} end
local earlier = redis.call('GET', receipt)
if earlier then return {applied, reply_for(cjson.decode(earlier)), now} end
local ep = redis.call('HMGET', endpoint, 'disabled', 'open_until', 'paced_until',
                     'probing_until')
if ep[1] == '1' then return {applied, {}} end
local open_until = tonumber(ep[2] or '0')
if open_until > now then
  if expire_ms > 0 then
    -- Deliveries that waited for the endpoint longer than their whole retry schedule
    -- would have lasted: dead letters (replayable), the oldest due first, a few a call.
    local expired = {}
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, 20)) do
      local rec = prefix .. id
      local created = tonumber(redis.call('HGET', rec, 'created_ms') or '0')
      if created > 0 and created + expire_ms < now then
        redis.call('HSET', rec, 'state', 'inflight', 'claim', token)
        local entry = cjson.encode({at_ms = now, error = 'endpoint down for longer than '
                                    .. 'the retry schedule', outcome = 'dead'})
        complete(rec, id, token, 'dead', 0, entry, 'expired', 0, 0)
        expired[#expired + 1] = id
      end
    end
    if #expired > 0 then
      redis.call('ZREM', due, unpack(expired))
      flush()
    end
    return {applied, {}, now, #expired}
  end
  return {applied, {}}
end
local busy
if detach_ms > 0 then
  -- Claims younger than detach_ms (their deadline is claim time + visibility).
  busy = redis.call('ZCOUNT', inflight, now + visibility - detach_ms, '+inf')
else
  busy = redis.call('ZCARD', inflight)
end
local probing = false
if open_until > 0 then
  -- Half-open: one probe at a time until a probe's success closes the breaker.
  if tonumber(ep[4] or '0') > now then return {applied, {}} end
  max_in_flight, busy, probing = 1, 0, true
elseif tonumber(ep[3] or '0') > now then
  -- Paced: the endpoint answered 429 with Retry-After; until then it gets half the
  -- requests at once. (Stopping it, or one at a time, let a CRM that answers 429
  -- now and then throttle every delivery to a trickle.)
  max_in_flight = math.max(1, math.floor(max_in_flight / 2))
end
local free = math.min(max_in_flight - busy, limit)
if free <= 0 then return {applied, {}} end
local out, claimed = {}, {}
-- Scan due deliveries in pages: a long run of events of one call, each waiting for
-- its predecessor, must not hide the due deliveries of other calls behind it.
local scanned, offset, page = 0, 0, free * 2 + 16
while scanned < 2000 do
  local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', offset, page)
  if #ids == 0 then break end
  scanned = scanned + #ids
  for _, id in ipairs(ids) do
    local rec = prefix .. id
    local f = redis.call('HMGET', rec, 'prev', 'attempts', 'body', 'observed_ms', 'trace')
    local blocked = false
    if not f[3] then
      redis.call('ZREM', due, id)  -- record expired or deleted: nothing to send
      offset = offset - 1
      blocked = true
    elseif f[1] and f[1] ~= '' then
      -- Per-call order. enqueue.lua parks such deliveries outside the due set;
      -- this check only catches those queued by releases before parking existed.
      local p = redis.call('HMGET', prefix .. f[1], 'state', 'attempts')
      if p[1] and (p[1] == 'pending' or p[1] == 'inflight') and p[2] == '0' then
        blocked = true
      end
    end
    if not blocked then
      -- Moved from due to inflight together below (still in due while scanning:
      -- the offset counts it).
      redis.call('HSET', rec, 'state', 'inflight', 'claim', token)
      if probing then
        redis.call('HSET', rec, 'probe', token)
        redis.call('HSET', endpoint, 'probing_until', now + visibility)
      end
      out[#out + 1] = id
      out[#out + 1] = f[2]
      out[#out + 1] = f[3]
      out[#out + 1] = f[4]
      out[#out + 1] = f[5]
      claimed[#claimed + 1] = id
      if #claimed >= free then break end
    end
  end
  if #claimed >= free then break end
  offset = offset + #ids
end
if #claimed > 0 then
  -- free <= max_in_flight <= 1000: within what unpack() takes.
  redis.call('ZREM', due, unpack(claimed))
  local scored = {}
  for i, id in ipairs(claimed) do
    scored[2 * i - 1] = now + visibility
    scored[2 * i] = id
  end
  redis.call('ZADD', inflight, unpack(scored))
  redis.call('SET', receipt, cjson.encode(claimed), 'PX', math.max(1, visibility))
end
return {applied, out, now}
