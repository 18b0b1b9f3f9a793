-- rollout_add: creates a rollout's held commands for the candidates of one
-- hash slot (a Redis Cluster: rollout_create's work, one call per slot of
-- candidates, between rollout_state's `begin` and `open`). Which candidates
-- match and what a command gets: _rollout.lua. A retried call creates
-- nothing twice.
--
-- KEYS: per candidate i in ARGV order, 4 keys, all of one slot:
--   iot:dev:{<device i>}           hub_key_dev
--   iot:dev:{<device i>}:cmdlog    hub_key_dev_cmdlog
--   iot:cmd:{<id i>}               hub_key_cmd
--   iot:cmd:{<id i>}:log           hub_key_cmd_log
-- ARGV: as rollout_create's (ARGV[1..17], the rollout's fields; only 1-12
-- and 15 are read), then per candidate, sorted by device: device, command id.
--
-- Reply: the ids of the candidates that match (their commands exist), in order.
-- Errors: "ERR rollout_add: KEYS and ARGV do not match" (before any write).
--#include _command.lua
--#include _rollout.lua
local FIRST = 18

if #ARGV < FIRST - 1 or (#ARGV - FIRST + 1) % 2 ~= 0 or #KEYS ~= 2 * (#ARGV - FIRST + 1) then
  return redis.error_reply('ERR rollout_add: KEYS and ARGV do not match')
end
return add_candidates(1, FIRST)
