-- cmd_due: the overdue command ids in several slots' timers, read together:
-- the timer sweep on one Redis (commands/commands.c), where one
-- ZRANGEBYSCORE per slot that holds devices would be up to thousands of
-- calls a second. Read only. Where calls keep to one slot (a Redis
-- Cluster) the sweep reads each slot's timers with its own ZRANGEBYSCORE.
--
-- KEYS: iot:idx:{<tag>}:timers (hub_key_idx_timers) per slot.
-- ARGV[1] now (ms), ARGV[2] at most this many ids per key.
--
-- Reply: the overdue ids of every key, flat (each key's in deadline order).
-- Errors: "ERR cmd_due: bad arguments" (now or the limit not a number).
if #ARGV ~= 2 or not tonumber(ARGV[1]) or not tonumber(ARGV[2]) then
  return redis.error_reply('ERR cmd_due: bad arguments')
end
local out = {}
for i = 1, #KEYS do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  for _, id in ipairs(ids) do out[#out + 1] = id end
end
return out
