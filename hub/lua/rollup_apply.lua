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

-- The merge keeps the fields in locals, not in two tables a partial, and
-- the first and last values as their stored text (exact: they are copied,
-- never computed): about 40 % less than parsing both into tables and
-- formatting all nine (the per-partial cost is what a flush call holds
-- Redis for).
local PAT = '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$'
local match, tonum, format = string.match, tonumber, string.format
for i = p, #ARGV, 3 do
  local key, hf, part = KEYS[2 + tonum(ARGV[i])], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', key, hf)
  if not old then
    redis.call('HSET', key, hf, part)
  else
    local a1, a2, a3, a4, a5, a6, a7, a8, a9 = match(old, PAT)
    local b1, b2, b3, b4, b5, b6, b7, b8, b9 = match(part, PAT)
    a1, b1 = tonum(a1), tonum(b1)
    if a1 and b1 then -- a stored count that is not a number: left as it is
      a4, a5, a6, a8, b4, b5, b6, b8 = tonum(a4), tonum(a5), tonum(a6), tonum(a8),
                                       tonum(b4), tonum(b5), tonum(b6), tonum(b8)
      local c1, c2, c3 = a1 + b1, tonum(a2) + tonum(b2), tonum(a3) + tonum(b3)
      if b4 < a4 then a4 = b4 end
      if b5 > a5 then a5 = b5 end
      if b6 < a6 or (b6 == a6 and tonum(b7) < tonum(a7)) then a6, a7 = b6, b7 end
      if b8 > a8 or (b8 == a8 and tonum(b9) > tonum(a9)) then a8, a9 = b8, b9 end
      redis.call('HSET', key, hf, format('%d %.17g %.17g %.17g %.17g %d %s %d %s',
                                         c1, c2, c3, a4, a5, a6, a7, a8, a9))
    end
  end
end
for i = 1, nb do
  redis.call('PEXPIREAT', KEYS[2 + i], ARGV[4 + i])
end
return 1
