-- rollout_get: a rollout and how many of its commands are in each status.
-- The caller reads the rollout's command ids first (LRANGE of
-- iot:rollout:{<id>}:cmds, hub_key_rollout_cmds).
--
-- KEYS[1]  iot:rollout:{<id>}   hub_key_rollout
-- then iot:cmd:{<id>} (hub_key_cmd) per command of the rollout.
-- ARGV: none.
--
-- Reply: {HGETALL of the rollout, flat {status, count, ...}} ({{}, {}}: no
-- such rollout); a command gone counts as 'unknown'.
-- Errors: a key of the wrong type.
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return {{}, {}} end
local counts = {}
for i = 2, #KEYS do
  local st = redis.call('HGET', KEYS[i], 'status') or 'unknown'
  counts[st] = (counts[st] or 0) + 1
end
local out = {}
for k, v in pairs(counts) do out[#out + 1] = k; out[#out + 1] = v end
return {h, out}
