-- _outcomes.lua: shared snippet, included with `--#include outcomes` (after `now`).
-- Records the outcome of one attempt: `complete(rec, id, token, outcome, delay_ms,
-- history entry JSON, kind, pace_ms, first_delay_ms)`. Expects these locals: due, inflight, dead,
-- endpoint, chain, parked, ops (keys), prefix, retention, dead_retention, threshold,
-- cooloff, cooloff_max, history_max, ratio, min_attempts, bucket_ms (see complete.lua).
--
-- Idempotent: an outcome sent again for the same claim (a lost reply re-sent by the
-- client) returns what applied the first time (the record's done marker), changing
-- nothing.
--
-- The breaker (endpoint hash): `open_until` > now: open, nothing is sent; 0 < open_until
-- <= now: half-open, one probe at a time (claim.lua marks it: the record's `probe` is
-- its claim token, the endpoint's `probing_until` its deadline); 0: closed.
-- `failing_since`: the first failure since the last success while closed (the start
-- of the failure streak). Only a probe closes an open breaker (a late answer to a
-- request sent before it opened proves nothing about now): its success, or any HTTP
-- answer when the breaker opened on connection failures (`opened_by` 'conn': the
-- endpoint is reachable again, the error is an ordinary attempt). Closing marks every
-- delivery that failed since `failing_since` for promotion (`promote_from`,
-- promote.lua). A failed probe is not an attempt of its delivery: it reopens the
-- breaker for the next pause (cooloff doubling up to cooloff_max) and the delivery
-- stays first in line.
--
-- Operational events (subscription.breaker_opened, .recovered, .disabled,
-- delivery.dead_lettered) are appended to the subscription's `ops` stream in the same
-- step; the deliverer hands them on (`DeliveryQueue.ops_events`).

local function op(kind, ...)
  redis.call('XADD', ops, 'MAXLEN', '~', 10000, '*', 'type', kind, 'at', now, ...)
end

-- Writes that successes share are gathered and made once, before anything reads
-- what they change (a failure's breaker check, the claim that follows) and at the
-- end: the inflight ZREMs, the chain entries of finished calls, the window's success
-- count and the endpoint reset.
local gone_ids, ok_count, reset_pending = {}, 0, false
local ended_keys, ended_ids = {}, {}

-- Count attempts in the sliding window; for a failure, returns failures and total
-- over the window (a success needs neither).
local function window_add(ok, n)
  local bid = math.floor(now / bucket_ms)
  local slot = bid % 3
  if tonumber(redis.call('HGET', endpoint, 'wb' .. slot) or '-1') ~= bid then
    redis.call('HSET', endpoint, 'wb' .. slot, bid, 'wo' .. slot, 0, 'wf' .. slot, 0)
  end
  redis.call('HINCRBY', endpoint, ok and ('wo' .. slot) or ('wf' .. slot), n)
  if ok then return 0, 0 end
  local fails, total = 0, 0
  local f = redis.call('HMGET', endpoint, 'wb0', 'wo0', 'wf0', 'wb1', 'wo1', 'wf1',
                       'wb2', 'wo2', 'wf2')
  for i = 0, 2 do
    local b = f[3 * i + 1]
    if b and bid - tonumber(b) <= 2 then
      fails = fails + tonumber(f[3 * i + 3] or '0')
      total = total + tonumber(f[3 * i + 2] or '0') + tonumber(f[3 * i + 3] or '0')
    end
  end
  return fails, total
end

local function flush()
  -- In slices: unpack() takes a few thousand values at most.
  for i = 1, #gone_ids, 1000 do
    redis.call('ZREM', inflight, unpack(gone_ids, i, math.min(i + 999, #gone_ids)))
  end
  gone_ids = {}
  -- A call's chain entry names its last event queued; once that one is delivered or
  -- dead, nothing waits behind it and the entry goes (one HMGET and one HDEL for all,
  -- instead of two calls per delivery). An entry naming a later event stays.
  for i = 1, #ended_keys, 1000 do
    local last = math.min(i + 999, #ended_keys)
    local current = redis.call('HMGET', chain, unpack(ended_keys, i, last))
    local done = {}
    for j = i, last do
      if current[j - i + 1] == ended_ids[j] then done[#done + 1] = ended_keys[j] end
    end
    if #done > 0 then redis.call('HDEL', chain, unpack(done)) end
  end
  ended_keys, ended_ids = {}, {}
  if ok_count > 0 then
    window_add(true, ok_count)
    ok_count = 0
  end
  if reset_pending then
    -- A success while the breaker is closed ends a run of failures. While it is open
    -- or half-open, only a probe's success counts (see complete).
    if tonumber(redis.call('HGET', endpoint, 'open_until') or '0') == 0 then
      redis.call('HSET', endpoint, 'failures', 0, 'conn_failures', 0, 'opens', 0,
                 'failing_since', 0)
    end
    reset_pending = false
  end
end

-- A call delivery of `batch` had its first attempt: one fewer for the batch's events
-- to wait for (enqueue.lua); at none, they become due.
local function gate_passed(batch)
  if redis.call('HINCRBY', chain, '#' .. batch, -1) > 0 then return end
  redis.call('HDEL', chain, '#' .. batch)
  local w = redis.call('HGET', chain, '=' .. batch)
  if not w then return end
  redis.call('HDEL', chain, '=' .. batch)
  for _, hid in ipairs(cjson.decode(w)) do
    -- One the sweep freed already (held past its bound) is left where it is.
    if redis.call('HGET', prefix .. hid, 'state') == 'waiting' then
      redis.call('HSET', prefix .. hid, 'state', 'pending')
      redis.call('ZADD', due, now, hid)
      redis.call('ZREM', parked, hid)
    end
  end
end

-- A probe showed the endpoint back: close the breaker, and promote what failed since
-- the streak began (promote.lua, driven by the deliverer).
local function close_breaker()
  local ep = redis.call('HMGET', endpoint, 'failing_since', 'opened_ms')
  local since = tonumber(ep[1] or '0')
  if since <= 0 then since = tonumber(ep[2] or '0') end
  redis.call('HSET', endpoint, 'failures', 0, 'conn_failures', 0, 'open_until', 0,
             'opens', 0, 'failing_since', 0, 'probing_until', 0, 'recovered_ms', now,
             'promote_from', math.max(since, 1), 'promote_cursor', '(' .. now)
  redis.call('HDEL', endpoint, 'opened_by')
  -- The failures of the outage leave the window with it: judged by them, the first
  -- ordinary failure after the return would open the breaker again at once.
  redis.call('HDEL', endpoint, 'wb0', 'wo0', 'wf0', 'wb1', 'wo1', 'wf1', 'wb2', 'wo2', 'wf2')
  op('subscription.recovered', 'failing_since', since)
end

local function complete(rec, id, token, outcome, delay, entry, kind, pace, first)
  local f = redis.call('HMGET', rec, 'state', 'claim', 'done', 'done_outcome', 'history',
                       'attempts', 'next', 'callkey', 'probe', 'type', 'failed_ms',
                       'gate')
  local probe = f[9] == token
  local state = f[1]
  if not state then return 'gone' end
  if state ~= 'inflight' or f[2] ~= token then
    if f[3] == token then return f[4] end
    -- Our claim timed out and the delivery was handed to another worker (or it was
    -- replayed): record nothing, that worker owns the outcome now.
    return 'stale'
  end
  gone_ids[#gone_ids + 1] = id
  if outcome == 'release' then
    -- Shutdown handed the claim back before an answer came: not an attempt.
    redis.call('HSET', rec, 'claim', '', 'done', token, 'done_outcome', outcome,
               'state', 'pending')
    redis.call('ZADD', due, now, id)
    if probe then redis.call('HSET', endpoint, 'probing_until', 0) end
    return outcome
  end
  local reached = false
  if probe and outcome ~= 'success' and outcome ~= 'disable' then
    local e = cjson.decode(entry)
    if e.status ~= nil and e.status ~= cjson.null
       and redis.call('HGET', endpoint, 'opened_by') == 'conn' then
      -- The breaker opened because nothing answered; this probe got an HTTP answer
      -- (an error of the receiver's own, like a fifth of a flaky CRM's first
      -- attempts): the endpoint is reachable again. The breaker closes as on a
      -- success, and this is an ordinary failed attempt of its delivery.
      reached = true
    else
      -- A failed probe: the endpoint is still down. Not an attempt of this delivery
      -- (it was only picked to test the endpoint); it stays first in line.
      e.outcome, e.probe = 'probe_failed', true
      entry = cjson.encode(e)
      outcome = 'probe_failed'
    end
  end
  local history = f[5]
  if (history == nil or history == '[]') and history_max >= 1 then
    -- The first attempt (most of them): no need to decode anything.
    history = '[' .. entry .. ']'
  else
    local h = cjson.decode(history or '[]')
    h[#h + 1] = cjson.decode(entry)
    while #h > history_max do table.remove(h, 1) end
    history = cjson.encode(h)
  end
  -- Written once, with the state below.
  local w = {'claim', '', 'done', token, 'done_outcome', outcome, 'history', history}
  if outcome == 'probe_failed' then
    redis.call('HSET', rec, 'state', 'pending', unpack(w))
    redis.call('ZADD', due, now, id)
    local opens = redis.call('HINCRBY', endpoint, 'opens', 1)
    local pause = math.min(cooloff * 2 ^ (opens - 1), cooloff_max)
    redis.call('HSET', endpoint, 'open_until', now + pause, 'probing_until', 0)
    return outcome
  end
  if outcome == 'disable' then
    -- 410 Gone: the endpoint is switched off, this delivery waits with the others.
    redis.call('HSET', endpoint, 'disabled', '1', 'disabled_reason', '410 Gone',
               'disabled_ms', now, 'probing_until', 0)
    op('subscription.disabled', 'reason', '410 Gone')
    redis.call('HSET', rec, 'state', 'pending', unpack(w))
    redis.call('ZADD', due, now, id)
    return outcome
  end
  local attempts = tonumber(f[6] or '0') + 1
  w[#w + 1] = 'attempts'; w[#w + 1] = attempts
  local nxt = f[7]
  if attempts == 1 and nxt and nxt ~= '' then
    -- The first attempt happened: the call's next event may start now.
    local nrec = prefix .. nxt
    if redis.call('HGET', nrec, 'state') == 'waiting' then
      redis.call('HSET', nrec, 'state', 'pending')
      redis.call('ZADD', due, now, nxt)
    end
    redis.call('ZREM', parked, nxt)
    w[#w + 1] = 'next'; w[#w + 1] = ''
  end
  if attempts == 1 and f[12] and f[12] ~= '' then gate_passed(f[12]) end
  local function release_chain()
    local callkey = f[8]
    if callkey and callkey ~= '' then
      ended_keys[#ended_keys + 1] = callkey
      ended_ids[#ended_ids + 1] = id
    end
  end
  if outcome == 'success' then
    redis.call('HSET', rec, 'state', 'delivered', 'delivered_ms', now, unpack(w))
    redis.call('PEXPIRE', rec, retention)
    release_chain()
    ok_count, reset_pending = ok_count + 1, true
    if probe then
      close_breaker()
      return 'recovered'
    end
    return outcome
  end
  -- A failure reads the endpoint's state: earlier successes count first.
  flush()
  -- Closed first: this failure then starts a streak of the endpoint as it is now.
  if reached then close_breaker() end
  w[#w + 1] = 'failed_ms'; w[#w + 1] = now
  if kind == 'expired' or kind == 'lost' then
    -- Dead-lettered by age while the breaker was open (claim.lua), or an attempt
    -- without an answer because our side failed (_lost.lua, a crash): not the
    -- endpoint's doing.
  elseif kind == 'paced' then
    -- 429 with Retry-After: the endpoint asks us to slow down, it is not down. Until
    -- the time given it gets half its requests at once (this delivery itself waits
    -- for it); the breaker is not involved.
    local until_ms = now + pace
    if until_ms > tonumber(redis.call('HGET', endpoint, 'paced_until') or '0') then
      redis.call('HSET', endpoint, 'paced_until', until_ms)
    end
  else
    -- A failed attempt counts towards the breaker: a failure ratio over a recent
    -- window (a flaky endpoint that mostly works is not down), or consecutive
    -- connection failures (nothing listens there).
    redis.call('HINCRBY', endpoint, 'failures', 1)
    if tonumber(redis.call('HGET', endpoint, 'failing_since') or '0') == 0 then
      redis.call('HSET', endpoint, 'failing_since', now)
    end
    local conn = 0
    if kind == 'conn' then
      conn = redis.call('HINCRBY', endpoint, 'conn_failures', 1)
    else
      redis.call('HSET', endpoint, 'conn_failures', 0)
    end
    local fails, total = window_add(false, 1)
    local open_until = tonumber(redis.call('HGET', endpoint, 'open_until') or '0')
    local down = conn >= threshold or (total >= min_attempts and fails >= ratio * total)
    -- Open when closed; failures of requests that were in flight when it opened
    -- (open or half-open now) change nothing: only a probe reopens it.
    if open_until == 0 and down then
      local opens = redis.call('HINCRBY', endpoint, 'opens', 1)
      local pause = math.min(cooloff * 2 ^ (opens - 1), cooloff_max)
      redis.call('HSET', endpoint, 'open_until', now + pause, 'opened_ms', now,
                 'opened_by', conn >= threshold and 'conn' or 'ratio')
      op('subscription.breaker_opened', 'reason',
         conn >= threshold and (conn .. ' connection failures in a row')
         or (fails .. ' of ' .. total .. ' attempts failed'),
         'failing_since', redis.call('HGET', endpoint, 'failing_since') or now)
    end
  end
  if outcome == 'dead' then
    redis.call('HSET', rec, 'state', 'dead', 'dead_ms', now, unpack(w))
    redis.call('ZADD', dead, now, id)
    redis.call('PEXPIRE', rec, dead_retention)
    release_chain()
    local e = cjson.decode(entry)
    op('delivery.dead_lettered', 'event_id', id, 'event_type', f[10] or '',
       'attempts', attempts, 'last_error', e.error or '')
  else
    local before = tonumber(f[11] or '0')
    if first > 0 and first < delay and before > 0
       and before < tonumber(redis.call('HGET', endpoint, 'recovered_ms') or '0') then
      -- It failed during the outage, was promoted at the return and failed again:
      -- its attempt count says a later tier (minutes), but the endpoint has just come
      -- back. The first delay instead, once per recovery (failed_ms is now past it).
      delay, outcome = first, 'retry_soon'
    end
    redis.call('HSET', rec, 'state', 'pending', unpack(w))
    redis.call('ZADD', due, now + delay, id)
  end
  -- A dead letter is answered as such (counted by the caller); the promotion the
  -- closed breaker asks for is then found by the deliverer's upkeep (promote_from).
  if reached and outcome ~= 'dead' then return 'recovered' end
  return outcome
end

-- Every outcome of a JSON list (see the callers' headers), in order; what applied.
local function complete_all(items, rec_of)
  local out = {}
  for j, o in ipairs(items) do
    out[#out + 1] = complete(rec_of(j, o[1]), o[1], o[2], o[3], tonumber(o[4]), o[5],
                             o[6] or 'fail', tonumber(o[7] or '0'), tonumber(o[8] or '0'))
  end
  flush()
  return out
end
