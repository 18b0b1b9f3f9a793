-- aq_get: the cache of an analytics query and its single-flight lock
-- (hub/analytics.c, docs/analytics.md "Cache and single-flight"). Both
-- keys share the query's hash tag (one slot).
--
-- KEYS[1]  iot:aq:{<query hash>}        hub_key_aq: the cached answer
-- KEYS[2]  iot:aq:{<query hash>}:lock   hub_key_aq_lock: who computes it
-- ARGV[1] this request's token, ARGV[2] lock time (ms)
--
-- Reply: {1, answer} cached; {2} the lock is now this request's: compute
-- and store (aq_put); {0} another request holds the lock: ask again soon.
-- Errors: none of its own (a key of the wrong type fails it).
local v = redis.call('GET', KEYS[1])
if v then
  return {1, v}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
return {0}
