-- prov_setkey: registers (or with '' removes) a device's Ed25519 public key
-- for signed readings (docs/provenance.md), only if the device exists.
--
-- KEYS[1] iot:dev:{<device>}
-- ARGV[1] the key as 64 hex digits, or '' to remove it
--
-- Reply: 1 done, 0 no such device.
-- Errors: "ERR prov_setkey: KEYS and ARGV do not match" (checked before any write).
if #KEYS ~= 1 or #ARGV ~= 1 then
  return redis.error_reply('ERR prov_setkey: KEYS and ARGV do not match')
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '' then
  redis.call('HDEL', KEYS[1], 'sigkey')
else
  redis.call('HSET', KEYS[1], 'sigkey', ARGV[1])
end
return 1
