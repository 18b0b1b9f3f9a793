-- seen: last_seen and the rate-limit TAT of devices that sent readings
-- (the owning hub flushes them about once a second instead of writing per
-- frame), for devices still owned by the connection that thinks it owns
-- them. A device with no registry entry (Redis lost it) is left alone: no
-- partial record.
--
-- KEYS: per item, in ARGV order: iot:dev:{<device>}   hub_key_dev
-- ARGV[1] now (ms), then per item: connection id, TAT (ms, 0 = none).
--
-- Reply: the 0-based indexes of the items whose device another connection
-- owns (its takeover notice was missed: the hub drops the device).
-- Errors: "ERR seen: KEYS and ARGV do not match" (before any write).
--#include _maxset.lua
if #ARGV ~= 1 + 2 * #KEYS then
  return redis.error_reply('ERR seen: KEYS and ARGV do not match')
end
local lost = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local owner = redis.call('HGET', key, 'conn')
  if owner == ARGV[2 * i] then
    redis.call('HSET', key, 'last_seen', ARGV[1])
    maxset(key, 'rl', ARGV[2 * i + 1])
  elseif owner then
    lost[#lost + 1] = i - 1
  end
end
return lost
