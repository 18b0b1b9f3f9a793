-- cmd_list: a device's last commands, newest first, optionally of one
-- status. The caller reads the ids first (ZREVRANGE of the device's
-- iot:dev:{<device>}:cmdlog, hub_key_dev_cmdlog, newest first: a command's
-- key cannot be derived here) and passes their keys.
--
-- KEYS: iot:cmd:{<id>} (hub_key_cmd) per command, newest first.
-- ARGV[1] status ('' = any), ARGV[2] limit (at most this many).
--
-- Reply: an array of HGETALL arrays, newest first (commands gone since are
-- skipped).
-- Errors: "ERR cmd_list: bad arguments" (limit not a number).
local limit = tonumber(ARGV[2])
if not limit then return redis.error_reply('ERR cmd_list: bad arguments') end
local out = {}
for _, k in ipairs(KEYS) do
  if ARGV[1] == '' or redis.call('HGET', k, 'status') == ARGV[1] then
    local h = redis.call('HGETALL', k)
    if #h > 0 then out[#out + 1] = h end
  end
  if #out >= limit then break end
end
return out
