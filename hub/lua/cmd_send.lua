-- cmd_send: sends (or resends) a command to the connection that owns its
-- device right now: the next attempt, its ack deadline in the timers, a
-- `sent` transition. Expires a queued command past its ttl, times out a
-- sent one past its deadline or its attempts.
--
-- KEYS[1..5]  the command's group (_command.lua)
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] id, ARGV[4] connection id,
-- ARGV[5] the command's device (whose keys KEYS holds).
--
-- Reply: {1, device, name, params, attempt, expires_at, next deadline}: send
-- it | {0, why}: 'unknown' (no such command of that device), its status
-- when neither queued nor sent, 'held' (a rollout holds it), 'expired',
-- 'timed_out', 'not_owner' (the connection does not own the device online),
-- 'not_due' (sent to this connection and its ack is not due yet).
-- Errors: "ERR cmd_send: bad arguments" (before any write).
--#include _command.lua
if #KEYS ~= 5 or #ARGV ~= 5 or not now then
  return redis.error_reply('ERR cmd_send: bad arguments')
end
local k = ck(1)
local c = load(k)
if not c or c.device ~= ARGV[5] then return {0, 'unknown'} end
if c.status ~= 'queued' and c.status ~= 'sent' then return {0, c.status} end
if c.held == '1' then return {0, 'held'} end
if c.status == 'queued' and now >= tonumber(c.expires_at) then
  set(c, k, 'expired', {'error', 'ttl passed before the command could be sent'})
  return {0, 'expired'}
end
local d = redis.call('HMGET', k.dev, 'conn', 'online')
if d[1] ~= ARGV[4] or d[2] ~= '1' then return {0, 'not_owner'} end
if c.status == 'sent' then
  if c.sent_conn == ARGV[4] and now < tonumber(c.ack_due) then return {0, 'not_due'} end
  if now >= tonumber(c.deadline) then
    set(c, k, 'timed_out', {'error', 'no final state within timeout_s'})
    return {0, 'timed_out'}
  end
end
if c.status == 'sent' and tonumber(c.attempt) >= tonumber(c.max_attempts) and
   now < tonumber(c.ack_due) then
  return {0, 'not_due'} -- the last attempt still has its ack_timeout_s
end
local attempt = tonumber(c.attempt) + 1
if attempt > tonumber(c.max_attempts) then
  set(c, k, 'timed_out', {'error', 'no received after max_attempts sends'})
  return {0, 'timed_out'}
end
c.attempt = tostring(attempt)
local deadline = tonumber(c.deadline or (now + tonumber(c.timeout_s) * 1000))
local due = now + tonumber(c.ack_timeout_s) * 1000
redis.call('HSET', k.cmd, 'attempt', attempt, 'sent_at', c.sent_at or now,
  'last_sent_at', now, 'sent_conn', ARGV[4], 'ack_due', due, 'deadline', deadline)
local nxt = math.min(due, deadline)
redis.call('ZADD', k.timers, nxt, c.id)
set(c, k, 'sent')
return {1, c.device, c.name, c.params, attempt, c.expires_at, nxt}
