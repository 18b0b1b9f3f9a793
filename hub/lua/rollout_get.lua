-- rollout_get: a rollout and how many of its commands are in each status.
-- The caller reads the rollout's command ids first (LRANGE of
-- iot:rollout:{<id>}:cmds, hub_key_rollout_cmds). On a Redis Cluster,
-- where the commands are in their devices' slots, the caller counts their
-- statuses itself and passes the counts.
--
-- KEYS[1]  iot:rollout:{<id>}   hub_key_rollout
-- then iot:cmd:{<id>} (hub_key_cmd) per command of the rollout (one Redis),
-- or none (a cluster).
-- ARGV: none (one Redis), or the counts (a cluster): status, count, ...
--
-- Reply: {HGETALL of the rollout, flat {status, count, ...}} ({{}, {}}: no
-- such rollout); a command gone counts as 'unknown'.
-- Errors: a key of the wrong type.
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {{}, {}} end
if #ARGV > 0 then return {h, ARGV} end
local counts = {}
for i = 2, #KEYS do
  local st = redis.call('HGET', KEYS[i], 'status') or 'unknown'
  counts[st] = (counts[st] or 0) + 1
end
local out = {}
for k, v in pairs(counts) do out[#out + 1] = k; out[#out + 1] = v end
return {h, out}
