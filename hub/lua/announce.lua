-- announce: registers devices as online and owned by a connection (a
-- gateway's announce, or the hub re-announcing its own connections' devices
-- after Redis lost them, mode `rebuild`, hub/lease.c).
--
-- KEYS: per device i in ARGV order, 4 keys, all in the device's slot:
--   dev    iot:dev:{<device>}           hub_key_dev: the registry hash
--   type   iot:idx:{<tag>}:type:<type>  hub_key_idx_type: the announced type's
--                                       devices of the device's slot
--   all    iot:idx:{<tag>}:devices      hub_key_idx_devices: the devices of
--                                       the device's slot
--   run    iot:idx:{<tag>}:run:<run>    hub_key_idx_run: the devices of the
--                                       device's slot the connection's run
--                                       holds online
-- A call is one slot when its devices are (the hub groups them by slot on
-- a cluster); the caller marked each device's slot in the run's
-- iot:{hub}:runslots:<run> before (docs/streams.md "Instance leases").
-- ARGV[1] gateway, ARGV[2] connection id "<run id>:<serial>", ARGV[3] its run
-- id, ARGV[4] instance, ARGV[5] now (ms), ARGV[6] mode ('' or 'rebuild'),
-- ARGV[7] presence channel (HUB_CH_PRESENCE), ARGV[8] takeover channel
-- (HUB_CH_DEVTAKE), then per device: device, type, labels (a JSON object).
-- Ids and type names are [A-Za-z0-9._:-]: no JSON escaping.
--
-- In mode `rebuild` a device that another connection holds online is left
-- alone (it moved while this hub could not hear of it). Presence is
-- published only for a device whose state changed (it was offline or owned
-- by another connection, or its type or labels changed); devices taken from
-- another connection that held them online are named on the takeover
-- channel ("<device> <conn>\n" lines), so that connection stops storing
-- their readings.
--
-- The sets a device leaves are not in KEYS (their names are in the data
-- read here): the reply names them and the caller removes the device from
-- them with the detach script (hub/registry.c does, right after).
--
-- Reply: {tats, moved}: tats has, per device in order, its stored
-- rate-limit TAT ('0' = none), or '-1' when mode `rebuild` left it alone;
-- moved is flat, (device, old type, old connection) per device that left
-- the set of its old type (old type '' when it did not) or of its old
-- connection's run (old connection '' when it did not: no owner, or one of
-- the same run).
-- Errors: "ERR announce: KEYS and ARGV do not match" (before any write).
local conn, run, rebuild = ARGV[2], ARGV[3], ARGV[6] == 'rebuild'
local n = (#ARGV - 8) / 3
if n ~= math.floor(n) or n < 0 or #KEYS ~= 4 * n then
  return redis.error_reply('ERR announce: KEYS and ARGV do not match')
end
local pre = run .. ':'
local ev, taken, tats, moved = {}, {}, {}, {}
for i = 0, n - 1 do
  local dev, typ, labels = ARGV[9 + 3 * i], ARGV[10 + 3 * i], ARGV[11 + 3 * i]
  local key, tkey, akey, rkey = KEYS[1 + 4 * i], KEYS[2 + 4 * i], KEYS[3 + 4 * i], KEYS[4 + 4 * i]
  local old = redis.call('HMGET', key, 'type', 'labels', 'conn', 'online', 'rl')
  if rebuild and old[3] and old[3] ~= conn and old[4] == '1' then
    tats[i + 1] = '-1'
  else
    local otype, oconn = '', ''
    if old[1] and old[1] ~= typ then otype = old[1] end
    if old[3] and old[3] ~= conn and old[4] == '1' then
      taken[#taken + 1] = dev .. ' ' .. conn .. '\n'
    end
    if old[3] and string.sub(old[3], 1, #pre) ~= pre then oconn = old[3] end
    if otype ~= '' or oconn ~= '' then
      moved[#moved + 1] = dev
      moved[#moved + 1] = otype
      moved[#moved + 1] = oconn
    end
    redis.call('SADD', rkey, dev)
    redis.call('HSET', key, 'type', typ, 'labels', labels,
               'gateway', ARGV[1], 'conn', conn, 'instance', ARGV[4],
               'online', '1', 'last_seen', ARGV[5], 'announced_at', ARGV[5])
    redis.call('SADD', akey, dev)
    redis.call('SADD', tkey, dev)
    if old[3] ~= conn or old[4] ~= '1' or old[1] ~= typ or old[2] ~= labels then
      ev[#ev + 1] = dev .. '\t' .. typ .. '\t' .. labels ..
        '\t"device":"' .. dev .. '","online":true,"at":' .. ARGV[5] ..
        ',"gateway":"' .. ARGV[1] .. '","device_type":"' .. typ .. '"\n'
    end
    tats[i + 1] = old[5] or '0'
  end
end
if #ev > 0 then redis.call('PUBLISH', ARGV[7], '\n' .. table.concat(ev)) end
if #taken > 0 then redis.call('PUBLISH', ARGV[8], table.concat(taken)) end
return {tats, moved}
