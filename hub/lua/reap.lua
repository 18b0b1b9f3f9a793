-- reap: one batch of the reaping of a dead hub run (its lease expired,
-- docs/streams.md "Instance leases"): marks offline those of the given
-- devices that the dead run still owns online (connection "<run id>:<n>"),
-- publishing offline's presence event for them, and takes every given
-- device out of the run's set. The caller read the devices from that set
-- first (SRANDMEMBER: a device key is named in KEYS, so it cannot be popped
-- here). The caller claims the run for claim ms (renewed every batch, so a
-- reaper that dies is replaced); a run another live run is reaping, or
-- whose lease was renewed meanwhile (it was not dead, only late), is left
-- alone. When the set is empty the lease and the claim go. last_seen stays
-- what the dead run last flushed.
--
-- KEYS[1]  iot:{hub}:leases                       HUB_KEY_LEASES
-- KEYS[2]  iot:{hub}:reaper:<instance>:<token>     hub_key_run_reaper (of the dead run)
-- KEYS[3]  iot:inst:{<instance>}:<token>          hub_key_run (of the dead run)
-- then, per device in ARGV order: iot:dev:{<device>}   hub_key_dev
-- ARGV[1] the caller's run id, ARGV[2] the dead run's id, ARGV[3] claim (ms),
-- ARGV[4] presence channel (HUB_CH_PRESENCE), then the devices.
--
-- Reply: {0, why}: not reaped ('live': no expired lease of that run,
-- 'claimed': another run reaps it, 'self': the caller's own run), or
-- {1, dead run id, devices marked offline, more 1|0} (1: the set still
-- holds devices).
-- Errors: "ERR reap: KEYS and ARGV do not match" (before any write).
--#include _now.lua
local me, dead = ARGV[1], ARGV[2]
if #ARGV < 4 or #KEYS ~= 3 + (#ARGV - 4) then
  return redis.error_reply('ERR reap: KEYS and ARGV do not match')
end
if dead == me then return {0, 'self'} end
local score = redis.call('ZSCORE', KEYS[1], dead)
if not score or tonumber(score) >= now then return {0, 'live'} end
local who = redis.call('GET', KEYS[2])
if who and who ~= me then return {0, 'claimed'} end
redis.call('SET', KEYS[2], me, 'PX', ARGV[3])
local pre, ev = dead .. ':', {}
for i = 5, #ARGV do
  local dev, key = ARGV[i], KEYS[i - 1]
  redis.call('SREM', KEYS[3], dev)
  local h = redis.call('HMGET', key, 'conn', 'online', 'type', 'labels', 'gateway')
  if h[2] == '1' and h[1] and string.sub(h[1], 1, #pre) == pre then
    redis.call('HSET', key, 'online', '0')
    ev[#ev + 1] = dev .. '\t' .. (h[3] or '') .. '\t' .. (h[4] or '{}') ..
      '\t"device":"' .. dev .. '","online":false,"at":' .. now ..
      ',"gateway":"' .. (h[5] or '') .. '","device_type":"' .. (h[3] or '') .. '"\n'
  end
end
if #ev > 0 then redis.call('PUBLISH', ARGV[4], '\n' .. table.concat(ev)) end
if redis.call('EXISTS', KEYS[3]) == 1 then return {1, dead, #ev, 1} end
redis.call('ZREM', KEYS[1], dead)
redis.call('DEL', KEYS[2])
return {1, dead, #ev, 0}
