-- tier_take: counts one request of an API key against its tier's rate
-- (hub/analytics.c, docs/analytics.md "Usage tiers"): a fixed window on
-- Redis's clock, so every hub instance counts in the same window.
--
-- KEYS[1]  iot:tier:{<key name>}   hub_key_tier: hash w (window number), n (requests in it)
-- ARGV[1] requests allowed per window (> 0), ARGV[2] window (ms)
--
-- Reply: {1, 0} allowed; {0, ms} refused: the window ends in ms.
-- Errors: none of its own (a key of the wrong type fails it).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local win = tonumber(ARGV[2])
local w = math.floor(now / win)
local cur = redis.call('HMGET', KEYS[1], 'w', 'n')
local n = 1
if tonumber(cur[1]) == w then
  n = tonumber(cur[2]) + 1
  redis.call('HSET', KEYS[1], 'n', n)
else
  redis.call('HSET', KEYS[1], 'w', w, 'n', 1)
  redis.call('PEXPIRE', KEYS[1], 2 * win)
end
if n > tonumber(ARGV[1]) then
  return {0, (w + 1) * win - now}
end
return {1, 0}
