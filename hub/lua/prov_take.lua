-- prov_take: pops up to ARGV[1] streams whose chain head changed since the
-- last checkpoint and answers their heads (docs/provenance.md).
--
-- KEYS[1] iot:ph:{i<k>}  the shard's chain heads (stream key -> "<n> <hex>")
-- KEYS[2] iot:pd:{i<k>}  the shard's changed heads (set of stream keys)
-- ARGV[1] how many at most
--
-- Reply: {stream key, head, ...}; fewer than ARGV[1] pairs: the set is
-- empty now. A head that changes after this call is popped by the next
-- checkpoint.
-- Errors: "ERR prov_take: KEYS and ARGV do not match" (checked before any write).
if #KEYS ~= 2 or not tonumber(ARGV[1]) then
  return redis.error_reply('ERR prov_take: KEYS and ARGV do not match')
end
local m = redis.call('SPOP', KEYS[2], tonumber(ARGV[1]))
local out = {}
if #m == 0 then return out end
local h = redis.call('HMGET', KEYS[1], unpack(m))
for i = 1, #m do
  if h[i] then
    out[#out + 1] = m[i]
    out[#out + 1] = h[i]
  end
end
return out
