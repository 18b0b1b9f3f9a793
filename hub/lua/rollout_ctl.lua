-- rollout_ctl: pauses, resumes or cancels a rollout (POST
-- /v1/commands/{rollout id}/pause|resume|cancel, docs/commands.md
-- "Rollouts"). Pause stops releases (the rollout stays in the active set;
-- released commands carry on); resume lets them go on at the rollout's rate
-- (no burst: rollout_step caps the lag); cancel marks it `canceling`, and
-- the next rollout_step (the caller kicks one) cancels every command not yet
-- released and makes it `canceled`.
--
-- KEYS[1]  iot:rollout:{<id>}   hub_key_rollout
-- ARGV[1] action: pause | resume | cancel, ARGV[2] now (ms).
--
-- Reply: {1, new status} | {0, current status}: not possible from there
-- (pause of a paused or finished rollout, resume of a running one, cancel of
-- a finished one) | {-1}: no such rollout.
-- Errors: "ERR rollout_ctl: bad arguments".
local act, now = ARGV[1], ARGV[2]
if #KEYS ~= 1 or #ARGV ~= 2 or not (act == 'pause' or act == 'resume' or act == 'cancel') then
  return redis.error_reply('ERR rollout_ctl: bad arguments')
end
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {-1} end
local to = nil
if act == 'pause' and st == 'running' then to = 'paused'
elseif act == 'resume' and st == 'paused' then to = 'running'
elseif act == 'cancel' and (st == 'running' or st == 'paused') then to = 'canceling'
end
if not to then return {0, st} end
redis.call('HSET', KEYS[1], 'status', to, 'updated_at', now)
return {1, to}
