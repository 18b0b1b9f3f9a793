-- cmd_stats_put: keeps one minute of command transition counts
-- (docs/commands.md "Commands by state"). Every hub counts every status
-- event of the commands channel it hears and writes its counts of a minute
-- here: each field keeps the larger of the stored and the given count, so
-- the hubs of one Redis agree on the count without double counting, and a
-- hub that started in the middle of the minute lowers nothing.
--
-- KEYS[1]  iot:{cstats}:m:<minute start ms>   hub_key_cstats
-- ARGV[1]  the key's time to live (s); then pairs: field ("<state>" or
--          "<device type>|<state>"), count.
--
-- Reply: the number of fields raised.
-- Errors: "ERR cmd_stats_put: bad arguments" (a ttl or count not a number);
-- a key of the wrong type.
local ttl = tonumber(ARGV[1])
if not ttl or ttl < 1 or #ARGV % 2 ~= 1 then
  return redis.error_reply('ERR cmd_stats_put: bad arguments')
end
local raised = 0
for i = 2, #ARGV - 1, 2 do
  local v = tonumber(ARGV[i + 1])
  if not v then return redis.error_reply('ERR cmd_stats_put: bad arguments') end
  if v > tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or 0) then
    redis.call('HSET', KEYS[1], ARGV[i], v)
    raised = raised + 1
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
return raised
