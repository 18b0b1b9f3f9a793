-- cmd_owed: what the gateway of announced devices is owed: cancels of
-- commands it had been sent, then the pending commands in creation order.
-- One call for a whole announce message, however many devices it names.
--
-- KEYS: per device in ARGV order, 2 keys:
--   iot:dev:{<device>}:cancels   hub_key_dev_cancels
--   iot:dev:{<device>}:cmds      hub_key_dev_cmds
-- ARGV: the devices.
--
-- Reply: flat, {device, {cancel ids}, {pending ids}} per device that is owed
-- anything.
-- Errors: "ERR cmd_owed: KEYS and ARGV do not match".
if #KEYS ~= 2 * #ARGV then
  return redis.error_reply('ERR cmd_owed: KEYS and ARGV do not match')
end
local out = {}
for i, dev in ipairs(ARGV) do
  local cancels = redis.call('SMEMBERS', KEYS[2 * i - 1])
  local ids = redis.call('ZRANGE', KEYS[2 * i], 0, -1)
  if #cancels > 0 or #ids > 0 then
    out[#out + 1] = dev
    out[#out + 1] = cancels
    out[#out + 1] = ids
  end
end
return out
