-- connect: a new connection of a gateway: its epoch (INCR: orders the
-- gateway's connections across instances, the newest wins), whether the
-- connect rate allows it (GCRA on the `connect` TAT, docs/protocol.md
-- "Limits"), and the gateway's stored rate-limit TATs.
--
-- KEYS[1]  iot:gw:{<gateway>}:epoch    hub_key_gw_epoch
-- KEYS[2]  iot:gw:{<gateway>}:limits   hub_key_gw_limits (expires once every TAT is past)
-- ARGV[1] now (ms), ARGV[2] connect rate (per s, 0 = unlimited),
-- ARGV[3] connect burst.
--
-- Reply: {epoch, allowed 1|0, retry after (ms), telemetry TAT, announce TAT,
-- ack TAT} (TATs as strings, '0' = none).
-- Errors: "ERR connect: bad arguments" (a number that is not one); a key of
-- the wrong type.
local GRACE_MS = 60000   -- the limits hash outlives its latest TAT by this

local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not (now and rate and burst) then
  return redis.error_reply('ERR connect: bad arguments')
end
local epoch = redis.call('INCR', KEYS[1])
local lk = KEYS[2]
local h = redis.call('HMGET', lk, 'connect', 'telemetry', 'announce', 'ack')
local ok, retry = 1, 0
if rate > 0 then
  local t = 1000 / rate
  local tat = math.max(tonumber(h[1] or 0), now) + t
  if tat - now > burst * t then
    ok, retry = 0, math.ceil(tat - now - burst * t)
  else
    redis.call('HSET', lk, 'connect', tat)
    redis.call('PEXPIRE', lk, math.ceil(tat - now) + GRACE_MS)
  end
end
return {epoch, ok, retry, h[2] or '0', h[3] or '0', h[4] or '0'}
