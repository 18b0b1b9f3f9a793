-- _now: library (--#include _now.lua): `now`, Redis's clock in ms. The
-- lease scripts compare leases on this one clock, whatever the hub hosts'
-- clocks say.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
