-- reap_done: the end of the reaping of a dead hub run, once the caller
-- found every set of the run's marked slots empty (docs/streams.md
-- "Instance leases"), in the {hub} slot. When the lease is still expired
-- (or gone), the lease and the slot bitmap go; a lease renewed meanwhile
-- (the run was late, not dead: it re-announces its devices once the claim
-- is gone) stays, and so does its bitmap. The caller's claim goes either
-- way; another run's claim is left.
--
-- KEYS[1]  iot:{hub}:leases                       HUB_KEY_LEASES
-- KEYS[2]  iot:{hub}:reaper:<instance>:<token>    hub_key_run_reaper (of the dead run)
-- KEYS[3]  iot:{hub}:runslots:<instance>:<token>  hub_key_runslots (of the dead run)
-- ARGV[1] the caller's run id, ARGV[2] the dead run's id.
--
-- Reply: 1 the run's lease and bitmap went, 0 they stay (renewed, or
-- another run holds the claim).
-- Errors: "ERR reap_done: KEYS and ARGV do not match" (before any write).
--#include _now.lua
if #KEYS ~= 3 or #ARGV ~= 2 then
  return redis.error_reply('ERR reap_done: KEYS and ARGV do not match')
end
local me, dead = ARGV[1], ARGV[2]
local who = redis.call('GET', KEYS[2])
if who and who ~= me then return 0 end
redis.call('DEL', KEYS[2])
local score = redis.call('ZSCORE', KEYS[1], dead)
if score and tonumber(score) >= now then return 0 end
redis.call('ZREM', KEYS[1], dead)
redis.call('DEL', KEYS[3])
return 1
