-- rollup_read: reads the partials of some devices' field from the bucket
-- hashes of one rollup shard and granularity (GET /v1/aggregates,
-- hub/analytics.c). Read-only.
--
-- KEYS[1..]  iot:ru:{i<k>}:<g>:<start>   hub_key_ru_bucket, buckets in time order
-- ARGV[1..]  hash fields "<device>|<field>" (at most 1,000 per call)
--
-- Reply: a flat array of (key index, field index, partial) for the cells
-- that exist; the missing ones are left out.
-- Errors: none of its own (a key of the wrong type fails it).
local out, n = {}, 0
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], unpack(ARGV))
  for j = 1, #ARGV do
    if v[j] then
      out[n + 1] = i
      out[n + 2] = j
      out[n + 3] = v[j]
      n = n + 3
    end
  end
end
return out
