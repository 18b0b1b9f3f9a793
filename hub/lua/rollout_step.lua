-- rollout_step: one release step of a running rollout (any instance may run
-- it; it is atomic): releases the held commands that are due at
-- max_per_minute, counting from the rollout's creation (the first at once),
-- into their devices' queues and the timers; aborts the rollout when
-- failures (failed, rejected, timed_out, expired) among its finished
-- released commands exceed abort_failure_ratio once at least min_finished
-- have finished (the held rest become canceled); completes it when every
-- command is final. A `paused` rollout releases nothing (it stays in the
-- active set); a `canceling` one cancels its commands not yet released and
-- becomes `canceled`. With online_only, a due command whose device is
-- offline is canceled instead of released ("skipped: device offline").
--
-- The caller reads the rollout's command ids (LRANGE of
-- iot:rollout:{<id>}:cmds) and their devices (cmd_devices) first: their keys
-- cannot be derived here. Both never change once the rollout exists.
--
-- KEYS[1]  iot:rollout:{<id>}        hub_key_rollout
-- KEYS[2]  iot:rollout:{<id>}:cmds   hub_key_rollout_cmds
-- KEYS[3]  iot:{hub}:rollouts        HUB_KEY_ROLLOUTS_ACTIVE
-- then per command in the list's order, its group (_command.lua): 5 keys,
-- or only cmd, log and timers when its device is '' (the command is gone).
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] rollout id, then per
-- command in the list's order its device ('' = gone).
--
-- Reply: {1, (id, device, instance, online, expires_at) per command released
-- now} | {0}: finished (it leaves the active set) | {2}: aborted | {3}:
-- canceled now | {4}: paused.
-- Errors: "ERR rollout_step: KEYS and ARGV do not match", "ERR rollout_step:
-- not the rollout's commands" (before any write).
--#include _command.lua
local FIRST, MAX_LAG_MS = 4, 1000

local g, pos = {}, 4
for i = FIRST, #ARGV do
  if ARGV[i] ~= '' then
    g[#g + 1] = ck(pos)
    pos = pos + 5
  else
    g[#g + 1] = {cmd = KEYS[pos], log = KEYS[pos + 1], timers = KEYS[pos + 2]}
    pos = pos + 3
  end
end
if #ARGV < FIRST - 1 or pos ~= #KEYS + 1 then
  return redis.error_reply('ERR rollout_step: KEYS and ARGV do not match')
end
local rid = ARGV[3]
local rk = KEYS[1]
local r = {}
local a = redis.call('HGETALL', rk)
for i = 1, #a, 2 do r[a[i]] = a[i + 1] end
if r.status == 'paused' then return {4} end
if r.status ~= 'running' and r.status ~= 'canceling' then
  redis.call('ZREM', KEYS[3], rid)
  return {0}
end
local ids = redis.call('LRANGE', KEYS[2], 0, -1)
if #ids ~= #g then
  return redis.error_reply("ERR rollout_step: not the rollout's commands")
end
local released = tonumber(r.released)
local function finish(status)
  redis.call('HSET', rk, 'status', status, 'updated_at', now)
  redis.call('ZREM', KEYS[3], rid)
  redis.call('EXPIRE', rk, FINAL_TTL_S)
  redis.call('EXPIRE', KEYS[2], FINAL_TTL_S)
end
-- The commands not yet released become canceled, with why.
local function cancel_held(why)
  for i = released + 1, #ids do
    local c = g[i].dev and load(g[i])
    if c and c.status == 'queued' then
      set(c, g[i], 'canceled', {'error', why})
    end
  end
end
if r.status == 'canceling' then
  cancel_held('rollout canceled')
  finish('canceled')
  return {3}
end
local fails, finished, open = 0, 0, 0
for i = 1, released do
  local st = redis.call('HGET', g[i].cmd, 'status')
  if st and FINAL[st] then
    if st ~= 'canceled' then
      finished = finished + 1
      if st ~= 'succeeded' then fails = fails + 1 end
    end
  else open = open + 1 end
end
if finished >= tonumber(r.min_finished) and finished > 0 and
   fails / finished > tonumber(r.abort_failure_ratio) then
  cancel_held('rollout aborted: failure ratio crossed')
  finish('aborted')
  return {2}
end
-- The rate: release_clock advances by 60000/max_per_minute per release and
-- never lags now by more than MAX_LAG_MS, so a pause (no hub running, Redis
-- down) is not followed by a burst.
local gap = 60000 / tonumber(r.max_per_minute)
local clock = tonumber(r.release_clock or (tonumber(r.created_at) - gap))
if clock < now - MAX_LAG_MS - gap then clock = now - MAX_LAG_MS - gap end
local due = math.floor((now - clock) / gap)
local upto = math.min(#ids, released + math.max(due, 0))
redis.call('HSET', rk, 'release_clock', clock + (upto - released) * gap)
local out = {1}
for i = released + 1, upto do
  local c = g[i].dev and load(g[i])
  local d = c and redis.call('HMGET', g[i].dev, 'instance', 'online')
  if c and c.status == 'queued' and r.online_only == '1' and d[2] ~= '1' then
    set(c, g[i], 'canceled', {'error', 'skipped: device offline at release (online_only)'})
  elseif c and c.status == 'queued' then
    local exp = now + tonumber(c.ttl_s) * 1000
    redis.call('HSET', g[i].cmd, 'held', 0, 'expires_at', exp, 'released_at', now)
    redis.call('ZADD', g[i].cmds, nextseq(g[i]), c.id)
    redis.call('ZADD', g[i].timers, exp, c.id)
    out[#out + 1] = c.id
    out[#out + 1] = c.device
    out[#out + 1] = d[1] or ''
    out[#out + 1] = d[2] or '0'
    out[#out + 1] = exp
    open = open + 1
  end
end
if upto > released then redis.call('HSET', rk, 'released', upto, 'updated_at', now) end
-- Completed once every command is final, released or not (held ones
-- canceled one by one, or skipped, count): at once, not when the release
-- clock reaches them.
local done = true
for i = 1, #ids do
  local st = redis.call('HGET', g[i].cmd, 'status')
  if not (st and FINAL[st]) then done = false; break end
end
if done then
  finish('completed')
end
return out
