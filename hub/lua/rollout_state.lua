-- rollout_state: a rollout's own keys on a Redis Cluster, where its
-- commands live in their devices' slots and no script sees them all
-- (docs/commands.md "Rollouts on a Redis Cluster"). The rollout id is drawn
-- in the slot of {hub}, so its keys and the active set share one slot. One
-- script, several actions; the caller reads and changes the commands with
-- per-slot calls (rollout_add, rollout_one) between them.
--
-- KEYS[1]  iot:rollout:{<id>}        hub_key_rollout
-- KEYS[2]  iot:rollout:{<id>}:cmds   hub_key_rollout_cmds
-- KEYS[3]  iot:{hub}:rollouts        HUB_KEY_ROLLOUTS_ACTIVE (not for `read`:
--          an id drawn elsewhere, e.g. one asked for by a client, is read
--          alone)
-- ARGV[1] now (ms), ARGV[2] action, ARGV[3] rollout id, then:
--   begin  ARGV[4..17] as rollout_create's ARGV[4..17], then every
--          candidate's command id: the rollout, `creating`, in the active
--          set, its list holding every id a command may get (so that an
--          interrupted creation can be canceled). Reply: 1.
--   open   the ids of the commands created (rollout_add's replies, in
--          candidate order): the list becomes them, `total` their count;
--          `creating` becomes `running` (or `completed` with none). A
--          rollout no longer `creating` (canceled meanwhile) keeps its
--          status. Reply: the count.
--   read   Reply: {HGETALL of the rollout, its command ids} ({{}, {}}: none).
--   stale  ARGV[4] grace (ms): a rollout `creating` since more than grace
--          becomes `canceling` (its creator died). Reply: 1 changed, 0 not.
--   advance  a `running` rollout's release clock, as rollout_step's: the
--          commands from position `released`+1 to the reply's upto are due
--          now and count as released. Reply: {1, from, upto} | {0, status}.
--   finish ARGV[4] expected status, ARGV[5] final status: the rollout
--          leaves the active set and expires (as rollout_step's); a status
--          other than expected is left alone (reply {0, status}), a rollout
--          gone leaves the active set (reply {0}). Reply: {1}.
--   drop   a rollout neither creating, running, paused nor canceling (or
--          gone) leaves the active set. Reply: 1 dropped, 0 not.
-- Errors: "ERR rollout_state: bad arguments".
local now, act, rid = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local FINAL_TTL_S, MAX_LAG_MS = 2592000, 1000
local rk, lk, ak = KEYS[1], KEYS[2], KEYS[3]
if not now or not (#KEYS == 3 or (#KEYS == 2 and act == 'read')) then
  return redis.error_reply('ERR rollout_state: bad arguments')
end

if act == 'begin' then
  if #ARGV < 17 then return redis.error_reply('ERR rollout_state: bad arguments') end
  redis.call('DEL', lk)
  redis.call('HSET', rk, 'id', rid, 'device_type', ARGV[4], 'labels', ARGV[5],
    'name', ARGV[7], 'params', ARGV[8], 'max_per_minute', ARGV[13], 'abort_failure_ratio', ARGV[14],
    'min_finished', ARGV[16], 'total', 0, 'released', 0, 'status', 'creating',
    'created_at', now, 'updated_at', now, 'owner', ARGV[15], 'online_only', ARGV[17])
  for i = 18, #ARGV do redis.call('RPUSH', lk, ARGV[i]) end
  redis.call('ZADD', ak, now, rid)
  return 1
elseif act == 'open' then
  local st = redis.call('HGET', rk, 'status')
  if not st then return 0 end
  redis.call('DEL', lk)
  for i = 4, #ARGV do redis.call('RPUSH', lk, ARGV[i]) end
  local n = #ARGV - 3
  redis.call('HSET', rk, 'total', n, 'updated_at', now)
  if st == 'creating' then
    redis.call('HSET', rk, 'status', n > 0 and 'running' or 'completed')
    if n == 0 then
      redis.call('ZREM', ak, rid)
      redis.call('EXPIRE', rk, FINAL_TTL_S)
    end
  end
  return n
elseif act == 'read' then
  local h = redis.call('HGETALL', rk)
  if #h == 0 then return {{}, {}} end
  return {h, redis.call('LRANGE', lk, 0, -1)}
elseif act == 'stale' then
  local a = redis.call('HMGET', rk, 'status', 'created_at')
  if a[1] == 'creating' and now - tonumber(a[2]) > tonumber(ARGV[4]) then
    redis.call('HSET', rk, 'status', 'canceling', 'updated_at', now)
    return 1
  end
  return 0
elseif act == 'advance' then
  local a = redis.call('HMGET', rk, 'status', 'max_per_minute', 'release_clock', 'created_at',
                       'released')
  if a[1] ~= 'running' then return {0, a[1] or ''} end
  local total = redis.call('LLEN', lk)
  local released = tonumber(a[5])
  local gap = 60000 / tonumber(a[2])
  local clock = tonumber(a[3] or (tonumber(a[4]) - gap))
  if clock < now - MAX_LAG_MS - gap then clock = now - MAX_LAG_MS - gap end
  local due = math.floor((now - clock) / gap)
  local upto = math.min(total, released + math.max(due, 0))
  redis.call('HSET', rk, 'release_clock', clock + (upto - released) * gap)
  if upto > released then redis.call('HSET', rk, 'released', upto, 'updated_at', now) end
  return {1, released, upto}
elseif act == 'finish' then
  local st = redis.call('HGET', rk, 'status')
  if not st then
    redis.call('ZREM', ak, rid)
    return {0}
  end
  if st ~= ARGV[4] then return {0, st} end
  redis.call('HSET', rk, 'status', ARGV[5], 'updated_at', now)
  redis.call('ZREM', ak, rid)
  redis.call('EXPIRE', rk, FINAL_TTL_S)
  redis.call('EXPIRE', lk, FINAL_TTL_S)
  return {1}
elseif act == 'drop' then
  local st = redis.call('HGET', rk, 'status')
  if st == 'creating' or st == 'running' or st == 'paused' or st == 'canceling' then return 0 end
  redis.call('ZREM', ak, rid)
  return 1
end
return redis.error_reply('ERR rollout_state: bad arguments')
