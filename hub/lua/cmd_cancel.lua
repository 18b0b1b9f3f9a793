-- cmd_cancel: cancels a command that is not final. One that had been sent
-- is owed a cancel notice: its id goes into the device's cancels, sent to
-- the device's gateway now or at its next announce (cmd_owed).
--
-- KEYS[1..5]  the command's group (_command.lua)
-- KEYS[6]     iot:dev:{<device>}:cancels   hub_key_dev_cancels
-- KEYS[4..6] may be left out when the command's device is unknown (no such
-- command: the reply is then {-1}).
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] id, ARGV[4] the command's
-- device.
--
-- Reply: {1, previous status, device} | {0, status}: final already | {-1}:
-- no such command.
-- Errors: "ERR cmd_cancel: bad arguments" (before any write).
--#include _command.lua
if (#KEYS ~= 6 and #KEYS ~= 3) or #ARGV ~= 4 or not now then
  return redis.error_reply('ERR cmd_cancel: bad arguments')
end
local k = ck(1)
local c = load(k)
if not c or c.device ~= ARGV[4] or not k.dev then return {-1} end
if FINAL[c.status] then return {0, c.status} end
local was = c.status
set(c, k, 'canceled')
if was ~= 'queued' then redis.call('SADD', KEYS[6], c.id) end
return {1, was, c.device}
