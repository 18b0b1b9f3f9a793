-- cmd_tick: a command's deadline came (its timer, or the sweep found it
-- overdue in the timers): expires a queued command past its ttl, times out
-- one past its deadline or out of attempts, or asks for a resend when its
-- ack is overdue; else puts its next deadline back in the timers.
--
-- KEYS[1..5]  the command's group (_command.lua); KEYS[4..5] may be left out
--             when the command's device is unknown (no such command: it
--             only leaves the timers)
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] id, ARGV[4] the command's
-- device ('' when unknown).
--
-- Reply: {0, next deadline (0: none, it left the timers)} | {1, new final
-- state} | {2, device, instance holding it ('' none), online '1'|'0', next
-- deadline}: the ack timeout passed and attempts remain: resend.
-- Errors: "ERR cmd_tick: bad arguments" (before any write).
--#include _command.lua
if (#KEYS ~= 5 and #KEYS ~= 3) or #ARGV ~= 4 or not now then
  return redis.error_reply('ERR cmd_tick: bad arguments')
end
local k = ck(1)
local c = load(k)
if c and (c.device ~= ARGV[4] or not k.dev) then
  return redis.error_reply('ERR cmd_tick: KEYS are not those of the command\'s device')
end
if not c or FINAL[c.status] then redis.call('ZREM', k.timers, ARGV[3]); return {0, 0} end
if c.status == 'queued' then
  if now >= tonumber(c.expires_at) then
    set(c, k, 'expired', {'error', 'ttl passed before the command could be sent'})
    return {1, 'expired'}
  end
  redis.call('ZADD', k.timers, c.expires_at, c.id)
  return {0, tonumber(c.expires_at)}
end
local deadline = tonumber(c.deadline)
if now >= deadline then
  set(c, k, 'timed_out', {'error', 'no final state within timeout_s'})
  return {1, 'timed_out'}
end
if c.status == 'sent' and now >= tonumber(c.ack_due) then
  if tonumber(c.attempt) >= tonumber(c.max_attempts) then
    set(c, k, 'timed_out', {'error', 'no received after max_attempts sends'})
    return {1, 'timed_out'}
  end
  redis.call('ZADD', k.timers, deadline, c.id)
  local d = redis.call('HMGET', k.dev, 'instance', 'online')
  return {2, c.device, d[1] or '', d[2] or '0', deadline}
end
local nxt = deadline
if c.status == 'sent' then nxt = math.min(deadline, tonumber(c.ack_due)) end
redis.call('ZADD', k.timers, nxt, c.id)
return {0, nxt}
