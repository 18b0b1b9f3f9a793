-- aq_put: stores a computed analytics answer for the cache time and frees
-- the single-flight lock if it is still this request's (hub/analytics.c).
--
-- KEYS[1]  iot:aq:{<query hash>}        hub_key_aq
-- KEYS[2]  iot:aq:{<query hash>}:lock   hub_key_aq_lock
-- ARGV[1] the answer, ARGV[2] cache time (ms), ARGV[3] the token
--
-- Reply: 1.
-- Errors: none of its own (a key of the wrong type fails it).
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
