-- cmd_ack: a gateway's ack of a command (docs/commands.md): applies the
-- status when it moves the command forward (received only from sent;
-- in_progress or a final state from sent, received or in_progress). An ack
-- that changes nothing is not history: it bumps `ignored_acks` and
-- overwrites `last_ignored_ack` (nothing grows).
--
-- KEYS[1..5]  the command's group (_command.lua); KEYS[4..5] may be left out
--             when the command's device is unknown (no such command: the
--             reply is then {-1} and nothing is written)
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] id, ARGV[4] connection id,
-- ARGV[5] status, ARGV[6] progress (JSON number, ''), ARGV[7] message (''),
-- ARGV[8] result (JSON, ''), ARGV[9] error (''), ARGV[10] the command's
-- device ('' when unknown).
--
-- Reply: {1, status} applied | {0, current status} no change | {-1} not a
-- command of a device this connection owns.
-- Errors: "ERR cmd_ack: bad arguments" (before any write).
--#include _command.lua
if (#KEYS ~= 5 and #KEYS ~= 3) or #ARGV ~= 10 or not now then
  return redis.error_reply('ERR cmd_ack: bad arguments')
end
local k = ck(1)
local c = load(k)
if not c or c.device ~= ARGV[10] or not k.dev then return {-1} end
if redis.call('HGET', k.dev, 'conn') ~= ARGV[4] then return {-1} end
local st = ARGV[5]
local rank = {sent = 1, received = 2, in_progress = 3}
local cur = rank[c.status]
local ok = cur ~= nil and (st ~= 'received' or cur == 1)
local extra, f = '', {}
if ARGV[6] ~= '' then extra = extra .. ',"progress":' .. ARGV[6]; f[#f + 1] = 'progress'; f[#f + 1] = ARGV[6] end
if ARGV[7] ~= '' then extra = extra .. ',"message":' .. cjson.encode(ARGV[7]); f[#f + 1] = 'message'; f[#f + 1] = ARGV[7] end
if ARGV[8] ~= '' then extra = extra .. ',"result":' .. ARGV[8]; f[#f + 1] = 'result'; f[#f + 1] = ARGV[8] end
if ARGV[9] ~= '' then extra = extra .. ',"error":' .. cjson.encode(ARGV[9]); f[#f + 1] = 'error'; f[#f + 1] = ARGV[9] end
if not ok then
  redis.call('HINCRBY', k.cmd, 'ignored_acks', 1)
  redis.call('HSET', k.cmd, 'last_ignored_ack', '{"status":"' .. st .. '","at":' .. now .. '}')
  return {0, c.status}
end
if not FINAL[st] then redis.call('ZADD', k.timers, c.deadline, c.id) end
set(c, k, st, f, extra)
return {1, st}
