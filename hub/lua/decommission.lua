-- decommission: removes a device from the registry (DELETE /v1/devices/{d},
-- docs/admin-api.md) once its pending commands were canceled: its hash, its
-- entries in the slot-local device and type indexes, its owed cancels, and
-- with purge its command log. Its readings are not touched here (they live
-- in the ingest shards' streams, other slots: the caller deletes them).
--
-- KEYS, all in the device's slot:
--   iot:dev:{<device>}            hub_key_dev
--   iot:idx:{<tag>}:devices       hub_key_idx_devices (the device's slot)
--   iot:idx:{<tag>}:type:<type>   hub_key_idx_type (its type, read first)
--   iot:dev:{<device>}:cmds       hub_key_dev_cmds
--   iot:dev:{<device>}:cancels    hub_key_dev_cancels
--   iot:dev:{<device>}:cmdlog     hub_key_dev_cmdlog
-- ARGV: device, type (as read before the call), purge ("1": the command log
-- goes too; "0": kept, so GET /v1/devices/{d}/commands still lists them).
--
-- Reply: 1 removed; 0 no such device; -1 a command is still pending (one was
-- created after the caller canceled them: cancel and call again); -2 the
-- device's type changed since it was read (read and call again).
-- Errors: "ERR decommission: KEYS and ARGV do not match".
if #KEYS ~= 6 or #ARGV ~= 3 then
  return redis.error_reply('ERR decommission: KEYS and ARGV do not match')
end
local dev, idx, tidx, cmds, cancels, cmdlog = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local device, typ, purge = ARGV[1], ARGV[2], ARGV[3]

local t = redis.call('HGET', dev, 'type')
if not t then
  return 0
end
if t ~= typ then
  return -2
end
if redis.call('ZCARD', cmds) > 0 then
  return -1
end
redis.call('DEL', dev, cmds, cancels)
redis.call('SREM', idx, device)
redis.call('SREM', tidx, device)
if purge == '1' then
  redis.call('DEL', cmdlog)
end
return 1
