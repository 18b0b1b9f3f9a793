-- reap_claim: claims (or keeps claiming) the reaping of a dead hub run
-- (docs/streams.md "Instance leases"), in the {hub} slot: the run's lease
-- must have expired, and no other live run may hold the claim. The claim
-- is set (or renewed) for claim ms; the caller renews it before every reap
-- batch, so a reaper that dies is replaced once its claim expires.
--
-- KEYS[1]  iot:{hub}:leases                       HUB_KEY_LEASES
-- KEYS[2]  iot:{hub}:reaper:<instance>:<token>    hub_key_run_reaper (of the dead run)
-- KEYS[3]  iot:{hub}:runslots:<instance>:<token>  hub_key_runslots (of the dead run)
-- ARGV[1] the caller's run id, ARGV[2] the dead run's id, ARGV[3] claim
-- (ms), ARGV[4] '1' to get the run's slot bitmap in the reply, else '0'.
--
-- Reply: {0, why}: not to be reaped ('live': no expired lease of that run,
-- 'claimed': another run reaps it, 'self': the caller's own run), or
-- {1, bitmap} (the value of KEYS[3], '' when absent or not asked for).
-- Errors: "ERR reap_claim: KEYS and ARGV do not match" (before any write).
--#include _now.lua
if #KEYS ~= 3 or #ARGV ~= 4 then
  return redis.error_reply('ERR reap_claim: KEYS and ARGV do not match')
end
local me, dead = ARGV[1], ARGV[2]
if dead == me then return {0, 'self'} end
local score = redis.call('ZSCORE', KEYS[1], dead)
if not score or tonumber(score) >= now then return {0, 'live'} end
local who = redis.call('GET', KEYS[2])
if who and who ~= me then return {0, 'claimed'} end
redis.call('SET', KEYS[2], me, 'PX', ARGV[3])
local bits = ''
if ARGV[4] == '1' then bits = redis.call('GET', KEYS[3]) or '' end
return {1, bits}
