-- limits: keeps a gateway's rate-limit TATs between its connections
-- (docs/protocol.md "Limits"): each field keeps the later of the stored and
-- the given TAT; the hash expires a minute after its latest TAT.
--
-- KEYS[1]  iot:gw:{<gateway>}:limits   hub_key_gw_limits
-- ARGV[1] now (ms), ARGV[2] telemetry TAT, ARGV[3] announce TAT, ARGV[4] ack
-- TAT (wall-clock ms; 0 = none).
--
-- Reply: 1.
-- Errors: "ERR limits: bad arguments" (now not a number); a key of the wrong
-- type.
--#include _maxset.lua
local GRACE_MS = 60000

local lk, now = KEYS[1], tonumber(ARGV[1])
if not now then return redis.error_reply('ERR limits: bad arguments') end
maxset(lk, 'telemetry', ARGV[2])
maxset(lk, 'announce', ARGV[3])
maxset(lk, 'ack', ARGV[4])
local last = now
for _, v in ipairs(redis.call('HVALS', lk)) do last = math.max(last, tonumber(v) or 0) end
redis.call('PEXPIRE', lk, math.ceil(last - now) + GRACE_MS)
return 1
