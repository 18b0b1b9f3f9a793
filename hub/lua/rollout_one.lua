-- rollout_one: one held command of a rollout on a Redis Cluster, in its
-- device's slot: released into the device's queue and the timers, or
-- canceled (docs/commands.md "Rollouts on a Redis Cluster"). What
-- rollout_step does for each command on one Redis. Only a command still
-- `queued` and held, of this rollout, changes: a repeated or concurrent
-- call (two instances stepping the rollout) does nothing twice.
--
-- KEYS: the command's group (_command.lua), 5 keys.
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] rollout id, ARGV[4]
-- action: release | cancel, ARGV[5] online_only ('1': released while its
-- device is offline, it is canceled instead), ARGV[6] why (cancel's error).
--
-- Reply: {1, id, device, instance, online, expires_at}: released (the shape
-- of rollout_step's reply with one command) | {2}: canceled | {0}: nothing
-- to do.
-- Errors: "ERR rollout_one: bad arguments" (before any write).
--#include _command.lua
if #KEYS ~= 5 or #ARGV ~= 6 or (ARGV[4] ~= 'release' and ARGV[4] ~= 'cancel') then
  return redis.error_reply('ERR rollout_one: bad arguments')
end
local k = ck(1)
local c = load(k)
if not c or c.status ~= 'queued' or c.held ~= '1' or c.rollout ~= ARGV[3] then return {0} end
if ARGV[4] == 'cancel' then
  set(c, k, 'canceled', {'error', ARGV[6]})
  return {2}
end
local d = redis.call('HMGET', k.dev, 'instance', 'online')
if ARGV[5] == '1' and d[2] ~= '1' then
  set(c, k, 'canceled', {'error', 'skipped: device offline at release (online_only)'})
  return {2}
end
local exp = now + tonumber(c.ttl_s) * 1000
redis.call('HSET', k.cmd, 'held', 0, 'expires_at', exp, 'released_at', now)
redis.call('ZADD', k.cmds, nextseq(k), c.id)
redis.call('ZADD', k.timers, exp, c.id)
return {1, c.id, c.device, d[1] or '', d[2] or '0', exp}
