-- _maxset: library (--#include _maxset.lua) of the scripts that keep rate
-- limits between connections (docs/protocol.md "Limits"). Each limit is a
-- theoretical arrival time (TAT, wall-clock ms; hub/ratelimit.h); a save
-- keeps the later of the stored and the new one, so an older or concurrent
-- write never refills a bucket.
--
-- maxset(key, field, v): HSET key field v when v is a number > 0 and later
-- than the stored one.
local function maxset(key, field, v)
  v = tonumber(v)
  if v and v > 0 and v > tonumber(redis.call('HGET', key, field) or 0) then
    redis.call('HSET', key, field, v)
  end
end
