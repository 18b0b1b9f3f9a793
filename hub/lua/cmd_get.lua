-- cmd_get: a command and its history, read together.
--
-- KEYS[1]  iot:cmd:{<id>}     hub_key_cmd
-- KEYS[2]  iot:cmd:{<id>}:log hub_key_cmd_log
-- ARGV: none.
--
-- Reply: {HGETALL of the command (empty: none), its history entries (JSON
-- texts, oldest first, at most HISTORY_READ)}.
-- Errors: a key of the wrong type.
local HISTORY_READ = 1000
return {redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, HISTORY_READ - 1)}
