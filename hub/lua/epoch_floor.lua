-- epoch_floor: after Redis lost its data (hub/lease.c), puts back the epoch
-- of a live connection of a gateway, so that a later connection of the
-- gateway still counts as newer than it: the epoch is raised, never lowered.
--
-- KEYS[1]  iot:gw:{<gateway>}:epoch   hub_key_gw_epoch
-- ARGV[1] the live connection's epoch.
--
-- Reply: 1 raised, 0 the stored epoch was as high already.
-- Errors: "ERR epoch_floor: bad arguments" (not a number); a stored value
-- that is not a number.
local want = tonumber(ARGV[1])
if not want then return redis.error_reply('ERR epoch_floor: bad arguments') end
if tonumber(redis.call('GET', KEYS[1]) or 0) < want then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
