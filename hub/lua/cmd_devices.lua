-- cmd_devices: the devices of commands, read before a script that needs
-- the device's keys (rollout_step): a command's device never changes once
-- it is created, so what is read here still holds when that script runs.
--
-- KEYS: iot:cmd:{<id>} (hub_key_cmd) per command.
-- ARGV: none.
--
-- Reply: per command, in order, its device, or nil when the command is gone.
-- Errors: a key of the wrong type.
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('HGET', k, 'device')
end
return out
