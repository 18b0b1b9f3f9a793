-- lease_renew: renews a hub run's lease (docs/streams.md "Instance
-- leases") and reads the data generation. The epoch is set to the given
-- candidate when absent (Redis is empty or was flushed), and then the layout
-- version too: the caller passed the layout check on this connection, so a
-- missing one was flushed under the running hubs. On the first renewal of a
-- process (first = 1) the leases of earlier runs of the same instance id
-- end now: the instance was restarted, they are dead.
--
-- KEYS[1]  iot:{hub}:leases HUB_KEY_LEASES: run id -> lease expiry (Redis ms)
-- KEYS[2]  iot:{hub}:epoch HUB_KEY_EPOCH
-- KEYS[3]  iot:{hub}:layout HUB_LAYOUT_KEY
-- KEYS[4]  iot:{hub}:reaper:<instance>:<token> hub_key_run_reaper of the
--          caller's run: another run is reaping it (a caller whose lease
--          had expired re-announces its devices only once that is gone)
-- ARGV[1] instance id, ARGV[2] run id "<instance>:<token>", ARGV[3] ttl (ms),
-- ARGV[4] first ('1' or '0'), ARGV[5] epoch candidate, ARGV[6] layout version.
--
-- Reply: {epoch, had a lease 1|0, it had expired 1|0, expired leases,
-- {up to MAX_DEAD expired run ids, oldest first}, being reaped 1|0}.
-- Errors: "ERR lease_renew: bad arguments" (ttl not a number).
--#include _now.lua
local MAX_DEAD = 16

local inst, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
if not ttl then return redis.error_reply('ERR lease_renew: bad arguments') end
local ep = redis.call('GET', KEYS[2])
if not ep then
  ep = ARGV[5]
  redis.call('SET', KEYS[2], ep)
  redis.call('SET', KEYS[3], ARGV[6], 'NX')
end
local had = redis.call('ZSCORE', KEYS[1], me)
if ARGV[4] == '1' then
  local pre = inst .. ':'
  for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if m ~= me and #m == #me and string.sub(m, 1, #pre) == pre then
      redis.call('ZADD', KEYS[1], 0, m)
    end
  end
end
redis.call('ZADD', KEYS[1], now + ttl, me)
local expired = 0
if had and tonumber(had) < now then expired = 1 end
return {ep, had and 1 or 0, expired, redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. now),
        redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, MAX_DEAD),
        redis.call('EXISTS', KEYS[4])}
