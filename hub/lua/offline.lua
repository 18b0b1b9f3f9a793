-- offline: a connection closed: marks offline (and publishes presence for)
-- the devices it still owns and takes them out of its run's online set;
-- keeps every device's rate-limit TAT (docs/protocol.md "Limits"). A device
-- another connection took meanwhile is left as it is, but for its TAT. The
-- lease reaper (reap) publishes the same event for a dead run's devices.
--
-- KEYS: per device in ARGV order, 2 keys in the device's slot:
--   iot:dev:{<device>}                     hub_key_dev
--   iot:idx:{<tag>}:run:<run>              hub_key_idx_run: the set of the
--                                          device's slot of the connection's run
-- ARGV[1] connection id, ARGV[2] now (ms), ARGV[3] presence channel
-- (HUB_CH_PRESENCE), then per device: device, TAT (ms, 0 = none).
--
-- Reply: how many devices went offline.
-- Errors: "ERR offline: KEYS and ARGV do not match" (before any write).
--#include _maxset.lua
local conn = ARGV[1]
if #ARGV < 3 or (#ARGV - 3) % 2 ~= 0 or #KEYS ~= #ARGV - 3 then
  return redis.error_reply('ERR offline: KEYS and ARGV do not match')
end
local ev = {}
for i = 4, #ARGV, 2 do
  local dev = ARGV[i]
  local key, rkey = KEYS[i - 3], KEYS[i - 2]
  local h = redis.call('HMGET', key, 'conn', 'type', 'labels', 'gateway')
  if h[1] == conn then
    redis.call('HSET', key, 'online', '0', 'last_seen', ARGV[2])
    redis.call('SREM', rkey, dev)
    ev[#ev + 1] = dev .. '\t' .. h[2] .. '\t' .. h[3] ..
      '\t"device":"' .. dev .. '","online":false,"at":' .. ARGV[2] ..
      ',"gateway":"' .. h[4] .. '","device_type":"' .. h[2] .. '"\n'
  end
  if h[2] then maxset(key, 'rl', ARGV[i + 1]) end
end
if #ev > 0 then redis.call('PUBLISH', ARGV[3], '\n' .. table.concat(ev)) end
return #ev
