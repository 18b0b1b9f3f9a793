-- cmd_create: creates a command for a registered device (docs/commands.md):
-- queued in the device's queue, with its expiry in the timers, its first
-- history entry and a `queued` event. With an Idempotency-Key, the first
-- command created with it (kept a day) is answered instead.
--
-- KEYS[1..5]  the command's group (_command.lua: hub_key_cmd, hub_key_cmd_log,
--             hub_key_idx_timers, hub_key_dev, hub_key_dev_cmds), one slot:
--             the id was drawn in the device's slot
-- KEYS[6]     iot:dev:{<device>}:cmdlog          hub_key_dev_cmdlog
-- KEYS[7]     iot:idem:{<device>}:{<owner>}:<key> hub_key_idem; only with an
--                                                Idempotency-Key
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] id, ARGV[4] device,
-- ARGV[5] type, ARGV[6] name, ARGV[7] params (JSON), ARGV[8] ack_timeout_s,
-- ARGV[9] timeout_s, ARGV[10] ttl_s, ARGV[11] max_attempts, ARGV[12] owner,
-- ARGV[13] rollout id ('').
--
-- Reply: {1, id, expires_at, instance holding the device ('' none), online
-- '1'|'0'} | {0, id of the first command with this Idempotency-Key} |
-- {-1}: the device is not registered.
-- Errors: "ERR cmd_create: bad arguments" (before any write).
--#include _command.lua
local IDEM_TTL_S, CMDLOG_MAX = 86400, 1000

if #KEYS < 6 or #KEYS > 7 or #ARGV ~= 13 or not now or not tonumber(ARGV[10]) then
  return redis.error_reply('ERR cmd_create: bad arguments')
end
local k = ck(1)
local id, dev = ARGV[3], ARGV[4]
local d = redis.call('HMGET', k.dev, 'type', 'instance', 'online')
if not d[1] then return {-1} end
if KEYS[7] then
  local first = redis.call('GET', KEYS[7])
  if first then return {0, first} end
  redis.call('SET', KEYS[7], id, 'EX', IDEM_TTL_S)
end
local exp = now + tonumber(ARGV[10]) * 1000
redis.call('HSET', k.cmd, 'id', id, 'device', dev, 'type', ARGV[5], 'name', ARGV[6],
  'params', ARGV[7], 'status', 'queued', 'attempt', 0, 'max_attempts', ARGV[11],
  'ack_timeout_s', ARGV[8], 'timeout_s', ARGV[9], 'ttl_s', ARGV[10], 'created_at', now,
  'updated_at', now, 'expires_at', exp, 'owner', ARGV[12], 'rollout', ARGV[13])
local seq = nextseq(k, KEYS[6])
redis.call('ZADD', k.cmds, seq, id)
redis.call('ZADD', KEYS[6], seq, id)
redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -CMDLOG_MAX - 1)
redis.call('ZADD', k.timers, exp, id)
local c = {id = id, device = dev, type = ARGV[5], name = ARGV[6], attempt = '0'}
hist(k, '{"status":"queued","at":' .. now .. '}')
event(c, k, 'queued')
return {1, id, exp, d[2] or '', d[3] or '0'}
