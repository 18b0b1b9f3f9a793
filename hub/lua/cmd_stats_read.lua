-- cmd_stats_read: the command transition counts of a window of minutes
-- (docs/commands.md "Commands by state"), in one call.
--
-- KEYS     iot:{cstats}:m:<minute start ms> per minute of the window
--          (hub_key_cstats; one slot: the tag {cstats})
-- ARGV     none.
--
-- Reply: one array per key, in KEYS order: its fields and counts (HGETALL;
-- empty for a minute with no count or expired).
-- Errors: a key of the wrong type.
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('HGETALL', k) end
return out
