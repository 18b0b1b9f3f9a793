-- slots_mark: marks slots in the slot directory and in a run's slot
-- bitmap (docs/streams.md "Key names", "Instance leases"), before the
-- run's first announce into each of them: a walk over every device and a
-- reaper of the run then visit them.
--
-- KEYS[1]  iot:{hub}:slots                        HUB_KEY_SLOTS
-- KEYS[2]  iot:{hub}:runslots:<instance>:<token>  hub_key_runslots
-- ARGV: the slots (0..16383).
--
-- Reply: how many slots were given.
-- Errors: "ERR slots_mark: bad arguments" (a slot out of range, before
-- any write).
if #KEYS ~= 2 then return redis.error_reply('ERR slots_mark: bad arguments') end
for i = 1, #ARGV do
  local s = tonumber(ARGV[i])
  if not s or s < 0 or s > 16383 or s ~= math.floor(s) then
    return redis.error_reply('ERR slots_mark: bad arguments')
  end
end
for i = 1, #ARGV do
  redis.call('SETBIT', KEYS[1], ARGV[i], 1)
  redis.call('SETBIT', KEYS[2], ARGV[i], 1)
end
return #ARGV
