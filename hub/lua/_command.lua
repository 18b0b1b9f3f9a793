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
-- and a command's keys as a group from KEYS[i], read with ck(i), all in
-- one slot (the command's id is drawn in its device's slot, layout 3):
--   cmd    iot:cmd:{<id>}            hub_key_cmd
--   log    iot:cmd:{<id>}:log        hub_key_cmd_log
--   timers iot:idx:{<tag>}:timers    hub_key_idx_timers (of the id's slot):
--                                    command id -> next deadline
--   dev    iot:dev:{<device>}        hub_key_dev (of the command's device)
--   cmds   iot:dev:{<device>}:cmds   hub_key_dev_cmds
-- (dev and cmds are left out when the device is unknown: a group of 3).
-- nextseq(k, log) draws the device's next command seq (field cmd_seq of its
-- hash: orders its queue and its log; it starts above the highest seq its
-- queue or log hold, which layout 2 drew from one global counter).
local now = tonumber(ARGV[1])
local CH_COMMANDS = ARGV[2]
local HISTORY_MAX = 100
local FINAL_TTL_S = 2592000
local FINAL = {succeeded=true, failed=true, rejected=true, timed_out=true, expired=true,
               canceled=true}

local function ck(i)
  return {cmd = KEYS[i], log = KEYS[i + 1], timers = KEYS[i + 2], dev = KEYS[i + 3],
          cmds = KEYS[i + 4]}
end

local function nextseq(k, log)
  if redis.call('HEXISTS', k.dev, 'cmd_seq') == 0 then
    local top = 0
    for _, z in ipairs({k.cmds or false, log or false}) do
      if z then
        local a = redis.call('ZREVRANGE', z, 0, 0, 'WITHSCORES')
        if a[2] and tonumber(a[2]) > top then top = tonumber(a[2]) end
      end
    end
    redis.call('HSET', k.dev, 'cmd_seq', top)
  end
  return redis.call('HINCRBY', k.dev, 'cmd_seq', 1)
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
    redis.call('ZREM', k.timers, c.id)
    redis.call('ZREM', k.cmds, c.id)
    redis.call('EXPIRE', k.cmd, FINAL_TTL_S)
    redis.call('EXPIRE', k.log, FINAL_TTL_S)
  end
end
