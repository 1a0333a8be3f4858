-- complete.lua: record the outcomes of attempts of one subscription, several at once.
--
-- KEYS[1] due  KEYS[2] inflight  KEYS[3] dead  KEYS[4] endpoint  KEYS[5] chain
-- KEYS[6] parked  KEYS[7] ops (stream: operational events, see _outcomes.lua)
-- KEYS[7+j]    record hash of the j-th outcome's delivery
--
-- ARGV[1] retention_ms       delivered records are kept this long
-- ARGV[2] dead_retention_ms  dead letters are kept this long
-- ARGV[3] conn_threshold     consecutive connection failures that open the breaker
-- ARGV[4] cooloff_ms  ARGV[5] cooloff_max_ms   breaker pause, doubling per reopen
-- ARGV[6] history_max        attempts kept in a record's history
-- ARGV[7] JSON list of outcomes, in KEYS order:
--         [[event id, claim token, outcome, delay_ms, history entry JSON, kind,
--           pace_ms], ...]
--         outcome: success | retry | dead | disable | release
--         kind: ok | fail | conn (no connection: refused, DNS, TLS) | paced (429:
--         half the endpoint's requests at once for pace_ms; not a breaker failure) |
--         lost (no answer because our side failed: a crashed attempt; not the
--         endpoint's doing, the breaker is left alone)
-- ARGV[8] failure_ratio  ARGV[9] min_attempts  ARGV[10] window_ms
-- ARGV[11] prefix        the prefix of the delivery record keys: prefix .. <id> (`Keys.record_prefix`)
--         the breaker opens when at least failure_ratio of at least min_attempts
--         attempts in the last window_ms failed (3 buckets of window_ms / 3)
--
-- Endpoint hash fields: disabled, open_until, opens (reopen count), failures
-- (consecutive, informative), conn_failures, paced_until, wb<i>/wo<i>/wf<i>
-- (bucket id, successes and failures of window bucket i).
--
-- Reply: per outcome, what applied: the outcome itself ('recovered' for a probe's
-- success, 'probe_failed' for a probe's failure: see _outcomes.lua), 'stale' when the claim had
-- expired and moved to another worker (nothing recorded), 'gone' when the record
-- no longer exists. Idempotent: an outcome sent again for the same claim (a lost
-- reply re-sent by the client) returns what applied the first time, changing nothing.
-- The work per outcome is in _outcomes.lua (claim.lua records outcomes too).
--#include now
local due, inflight, dead, endpoint, chain = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local parked, ops, prefix = KEYS[6], KEYS[7], ARGV[11]
local retention, dead_retention = tonumber(ARGV[1]), tonumber(ARGV[2])
local threshold, cooloff, cooloff_max = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local history_max = tonumber(ARGV[6])
local ratio, min_attempts = tonumber(ARGV[8]), tonumber(ARGV[9])
local bucket_ms = math.max(1, math.floor(tonumber(ARGV[10]) / 3))

--#include outcomes

-- One JSON argument for all outcomes: packing five arguments per outcome cost the
-- client more CPU than the whole script costs the server.
return complete_all(cjson.decode(ARGV[7]), function(j) return KEYS[7 + j] end)
