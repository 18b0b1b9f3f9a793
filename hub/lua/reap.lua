-- reap: one batch of the reaping of a dead hub run (its lease expired,
-- docs/streams.md "Instance leases"): marks offline those of the given
-- devices that the dead run still owns online (connection "<run id>:<n>"),
-- publishing offline's presence event for them, and takes every given
-- device out of the run's set of its slot. The caller read the devices
-- from those sets first, and claimed the run (reap_claim, in the {hub}
-- slot) right before this call: the lease check is there, not here, so
-- that a call keeps to the devices' slot; a run that renewed its lease
-- meanwhile re-announces its devices only once the claim is gone
-- (hub/lease.c), after this call. last_seen stays what the dead run last
-- flushed.
--
-- KEYS: per device in ARGV order, 2 keys in the device's slot:
--   iot:dev:{<device>}                     hub_key_dev
--   iot:idx:{<tag>}:run:<dead run>         hub_key_idx_run
-- ARGV[1] the dead run's id, ARGV[2] presence channel (HUB_CH_PRESENCE),
-- then the devices.
--
-- Reply: how many devices were marked offline.
-- Errors: "ERR reap: KEYS and ARGV do not match" (before any write).
--#include _now.lua
local dead = ARGV[1]
if #ARGV < 2 or #KEYS ~= 2 * (#ARGV - 2) then
  return redis.error_reply('ERR reap: KEYS and ARGV do not match')
end
local pre, ev = dead .. ':', {}
for i = 3, #ARGV do
  local dev, key, rkey = ARGV[i], KEYS[2 * (i - 2) - 1], KEYS[2 * (i - 2)]
  redis.call('SREM', rkey, dev)
  local h = redis.call('HMGET', key, 'conn', 'online', 'type', 'labels', 'gateway')
  if h[2] == '1' and h[1] and string.sub(h[1], 1, #pre) == pre then
    redis.call('HSET', key, 'online', '0')
    ev[#ev + 1] = dev .. '\t' .. (h[3] or '') .. '\t' .. (h[4] or '{}') ..
      '\t"device":"' .. dev .. '","online":false,"at":' .. now ..
      ',"gateway":"' .. (h[5] or '') .. '","device_type":"' .. (h[3] or '') .. '"\n'
  end
end
if #ev > 0 then redis.call('PUBLISH', ARGV[2], '\n' .. table.concat(ev)) end
return #ev
