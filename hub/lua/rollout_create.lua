-- rollout_create: creates a fleet rollout (docs/commands.md "Rollouts"):
-- one command per matching device, `held` (not in the device's queue, no
-- timers) until rollout_step releases it, each with its first history entry
-- and a `queued` event; the rollout's hash; the rollout in the active set
-- when it has any command.
--
-- The candidates are the members of the device type's set
-- (iot:idx:{<tag>}:type:<type> of every slot, hub_key_idx_type), read by the
-- caller first and passed sorted: their keys cannot be derived here. Which
-- match: _rollout.lua. A candidate's command id is drawn by the caller in
-- the candidate's slot (derived from the rollout id and the candidate's
-- position). On a Redis Cluster the same is done in steps (rollout_open,
-- rollout_add).
--
-- KEYS[1]  iot:rollout:{<id>}        hub_key_rollout
-- KEYS[2]  iot:rollout:{<id>}:cmds   hub_key_rollout_cmds
-- KEYS[3]  iot:{hub}:rollouts        HUB_KEY_ROLLOUTS_ACTIVE
-- then per candidate i in ARGV order, 4 keys:
--   iot:dev:{<device i>}           hub_key_dev
--   iot:dev:{<device i>}:cmdlog    hub_key_dev_cmdlog
--   iot:cmd:{<id i>}               hub_key_cmd     (its command, if it matches)
--   iot:cmd:{<id i>}:log           hub_key_cmd_log
-- ARGV[1] now, ARGV[2] commands channel, ARGV[3] rollout id, ARGV[4] type,
-- ARGV[5] wanted labels (JSON object, ''), ARGV[6] device patterns (JSON
-- array, ''), ARGV[7] name, ARGV[8] params, ARGV[9] ack_timeout_s,
-- ARGV[10] timeout_s, ARGV[11] ttl_s, ARGV[12] max_attempts, ARGV[13]
-- max_per_minute, ARGV[14] abort_failure_ratio, ARGV[15] owner, ARGV[16]
-- min_finished, ARGV[17] online_only ('1': a device offline when its
-- command is due is skipped, its command canceled; '0'), then per
-- candidate, sorted by device: device, command id.
--
-- Reply: the number of commands created.
-- Errors: "ERR rollout_create: KEYS and ARGV do not match" (before any
-- write); labels or patterns that are not JSON (cjson's error).
--#include _command.lua
--#include _rollout.lua
local FIRST = 18

if #ARGV < FIRST - 1 or (#ARGV - FIRST + 1) % 2 ~= 0 or
   #KEYS ~= 3 + 2 * (#ARGV - FIRST + 1) then
  return redis.error_reply('ERR rollout_create: KEYS and ARGV do not match')
end
local ids = add_candidates(4, FIRST)
local n = #ids
for _, id in ipairs(ids) do redis.call('RPUSH', KEYS[2], id) end
redis.call('HSET', KEYS[1], 'id', ARGV[3], 'device_type', ARGV[4], 'labels', ARGV[5],
  'name', ARGV[7], 'params', ARGV[8], 'max_per_minute', ARGV[13], 'abort_failure_ratio', ARGV[14],
  'min_finished', ARGV[16], 'total', n, 'released', 0, 'status', n > 0 and 'running' or 'completed',
  'created_at', now, 'updated_at', now, 'owner', ARGV[15], 'online_only', ARGV[17])
if n > 0 then redis.call('ZADD', KEYS[3], now, ARGV[3]) end
return n
