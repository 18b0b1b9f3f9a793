-- rollup_apply: merges one flush of a hub's rollup partials (hub/rollup.c)
-- into the 1m/1h/1d bucket hashes of one rollup shard. Every key carries
-- the shard's hash tag {i<k>} (one slot on a Redis Cluster).
--
-- KEYS[1]  iot:ru:{i<k>}:applied        hub_key_ru_applied: flush ids applied (zset, score ms)
-- KEYS[2]  iot:ru:{i<k>}:devs           hub_key_ru_devs: device -> "<type>\t<labels JSON>"
-- KEYS[3..] iot:ru:{i<k>}:<g>:<start>   hub_key_ru_bucket: field "<device>|<field>" -> partial
-- ARGV[1] flush id, ARGV[2] now (ms), ARGV[3] how long applied ids are
-- kept (ms), ARGV[4] nb = #KEYS - 2, ARGV[5 .. 4+nb] each bucket key's
-- expiry (PEXPIREAT ms: bucket end + retention), then nd, nd x (device,
-- dimension), then (bucket key index 1..nb, hash field, partial) triples.
-- A partial is "count sum sumsq min max first_ts first last_ts last"
-- (hub/rollup_core.h); merging is the same as ru_part_merge.
--
-- Reply: 1 merged, 0 this flush id was merged already (a resend after a
-- lost reply: nothing is counted twice).
-- Errors: "ERR rollup: KEYS and ARGV do not match" before any write.
local nb = tonumber(ARGV[4])
if not nb or nb ~= #KEYS - 2 then
  return redis.error_reply('ERR rollup: KEYS and ARGV do not match')
end
local nd = tonumber(ARGV[5 + nb])
if not nd or (#ARGV - (5 + nb + 2 * nd)) % 3 ~= 0 then
  return redis.error_reply('ERR rollup: KEYS and ARGV do not match')
end
local now = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))

local p = 6 + nb
for _ = 1, nd do
  redis.call('HSET', KEYS[2], ARGV[p], ARGV[p + 1])
  p = p + 2
end

local PAT = '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$'
local function parse(s)
  local t = { string.match(s, PAT) }
  for i = 1, 9 do t[i] = tonumber(t[i]) end
  return t
end
local function fmt(t)
  return string.format('%d %.17g %.17g %.17g %.17g %d %.17g %d %.17g',
                       t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9])
end

for i = p, #ARGV, 3 do
  local key, hf = KEYS[2 + tonumber(ARGV[i])], ARGV[i + 1]
  local old = redis.call('HGET', key, hf)
  if not old then
    redis.call('HSET', key, hf, ARGV[i + 2])
  else
    local d, s = parse(old), parse(ARGV[i + 2])
    if d[1] and s[1] then
      d[1] = d[1] + s[1]
      d[2] = d[2] + s[2]
      d[3] = d[3] + s[3]
      if s[4] < d[4] then d[4] = s[4] end
      if s[5] > d[5] then d[5] = s[5] end
      if s[6] < d[6] or (s[6] == d[6] and s[7] < d[7]) then d[6] = s[6]; d[7] = s[7] end
      if s[8] > d[8] or (s[8] == d[8] and s[9] > d[9]) then d[8] = s[8]; d[9] = s[9] end
      redis.call('HSET', key, hf, fmt(d))
    end
  end
end
for i = 1, nb do
  redis.call('PEXPIREAT', KEYS[2 + i], ARGV[4 + i])
end
return 1
