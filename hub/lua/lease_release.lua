-- lease_release: a hub run shuts down and gives its lease up: the lease is
-- removed when the run holds no device online any more, else kept, expired
-- (score 0), so that a reaper marks those devices offline.
--
-- KEYS[1]  iot:{hub}:leases                HUB_KEY_LEASES
-- KEYS[2]  iot:inst:{<instance>}:<token>   hub_key_run: the run's online set
-- ARGV[1] run id.
--
-- Reply: 1 removed, 0 kept expired (or there was none).
-- Errors: none of its own.
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[1])
return 0
