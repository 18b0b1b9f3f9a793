-- detach: takes devices out of sets they no longer belong to: the set of a
-- device type they left, or the online set of a run that no longer holds
-- them (what announce names in its reply). A device that went back
-- meanwhile (its registry hash says the type again, or a connection of
-- that run again) stays.
--
-- Per device i in ARGV order, 2 keys, both in the device's slot:
--   KEYS[2i-1]  iot:dev:{<device>}                  hub_key_dev
--   KEYS[2i]    iot:idx:{<tag>}:type:<type>         hub_key_idx_type (how 'type'), or
--               iot:idx:{<tag>}:run:<run>           hub_key_idx_run (how 'run': the
--                                                   old run's set of the device's slot)
-- ARGV: per device: device, how ('type' or 'run'), the type or the run id.
--
-- Reply: how many devices were taken out.
-- Errors: "ERR detach: KEYS and ARGV do not match", "ERR detach: how is
-- 'type' or 'run'" (before any write).
local n = #ARGV / 3
if n ~= math.floor(n) or #KEYS ~= 2 * n then
  return redis.error_reply('ERR detach: KEYS and ARGV do not match')
end
for i = 2, #ARGV, 3 do
  if ARGV[i] ~= 'type' and ARGV[i] ~= 'run' then
    return redis.error_reply("ERR detach: how is 'type' or 'run'")
  end
end
local out = 0
for i = 0, n - 1 do
  local dev, how, v = ARGV[1 + 3 * i], ARGV[2 + 3 * i], ARGV[3 + 3 * i]
  local stays
  if how == 'type' then
    stays = redis.call('HGET', KEYS[1 + 2 * i], 'type') == v
  else
    local c = redis.call('HGET', KEYS[1 + 2 * i], 'conn')
    stays = c and string.sub(c, 1, #v + 1) == v .. ':'
  end
  if not stays then out = out + redis.call('SREM', KEYS[2 + 2 * i], dev) end
end
return out
