-- _command: library (--#include _command.lua) of the scripts that change a
-- command's state (docs/commands.md): load a command, append a history
-- entry, publish a status event on the dashboards' `commands` stream
-- (docs/dashboard.md line framing), and `set`, the one way a state changes
-- (final states leave the timers and the device's queue, and expire after
-- FINAL_TTL_S). A history keeps HISTORY_MAX entries: past that, the oldest
-- after the first (`queued`) goes, so the newest transitions and the final
-- state are always there.
--
-- What a script that includes it has:
--   ARGV[1]  now (ms)
--   ARGV[2]  the dashboards' commands channel (HUB_CH_COMMANDS)
--   KEYS[1]  iot:cmd:timers   HUB_KEY_CMD_TIMERS: command id -> next deadline
-- and a command's keys as a group from KEYS[i], read with ck(i):
--   cmd   iot:cmd:<id>              hub_key_cmd
--   log   iot:cmd:<id>:log          hub_key_cmd_log
--   dev   iot:dev:{<device>}        hub_key_dev (of the command's device)
--   cmds  iot:dev:{<device>}:cmds   hub_key_dev_cmds
local now = tonumber(ARGV[1])
local CH_COMMANDS = ARGV[2]
local K_TIMERS = KEYS[1]
local HISTORY_MAX = 100
local FINAL_TTL_S = 2592000
local FINAL = {succeeded=true, failed=true, rejected=true, timed_out=true, expired=true,
               canceled=true}

local function ck(i)
  return {cmd = KEYS[i], log = KEYS[i + 1], dev = KEYS[i + 2], cmds = KEYS[i + 3]}
end

local function load(k)
  local a = redis.call('HGETALL', k.cmd)
  if #a == 0 then return nil end
  local c = {}
  for i = 1, #a, 2 do c[a[i]] = a[i + 1] end
  return c
end

local function hist(k, entry)
  if redis.call('RPUSH', k.log, entry) > HISTORY_MAX then
    redis.call('LSET', k.log, 1, '')
    redis.call('LREM', k.log, 1, '')
  end
end

local function event(c, k, status, extra)
  local d = redis.call('HMGET', k.dev, 'type', 'labels')
  local body = '"id":' .. cjson.encode(c.id) .. ',"device":' .. cjson.encode(c.device) ..
    ',"name":' .. cjson.encode(c.name) .. ',"status":"' .. status .. '","at":' .. now ..
    ',"attempt":' .. (c.attempt or '0') .. (extra or '')
  redis.call('PUBLISH', CH_COMMANDS, '\n' .. c.device .. '\t' .. (d[1] or c.type) ..
    '\t' .. (d[2] or '{}') .. '\t' .. body .. '\n')
end

local function set(c, k, status, fields, extra)
  c.status = status
  if not extra and fields then
    for i = 1, #fields - 1, 2 do
      if fields[i] == 'error' then extra = ',"error":' .. cjson.encode(fields[i + 1]) end
    end
  end
  redis.call('HSET', k.cmd, 'status', status, 'updated_at', now)
  if fields and #fields > 0 then redis.call('HSET', k.cmd, unpack(fields)) end
  local a = ''
  if status == 'sent' then a = ',"attempt":' .. c.attempt end
  hist(k, '{"status":"' .. status .. '","at":' .. now .. a .. (extra or '') .. '}')
  event(c, k, status, extra)
  if FINAL[status] then
    redis.call('ZREM', K_TIMERS, c.id)
    redis.call('ZREM', k.cmds, c.id)
    redis.call('EXPIRE', k.cmd, FINAL_TTL_S)
    redis.call('EXPIRE', k.log, FINAL_TTL_S)
  end
end
