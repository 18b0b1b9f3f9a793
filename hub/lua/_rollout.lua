-- _rollout: library (--#include _rollout.lua, after _command.lua) of the
-- scripts that create a rollout's commands: rollout_create (one Redis, the
-- whole rollout in one call) and rollout_add (a cluster: one call per slot
-- of candidates, docs/commands.md "Rollouts on a Redis Cluster").
--
-- add_candidates(kfirst, afirst) takes the candidates from ARGV[afirst..]
-- (pairs: device, command id, sorted by device) and their keys from
-- KEYS[kfirst..] (4 per candidate: iot:dev:{<device>}, its :cmdlog,
-- iot:cmd:{<id>}, its :log), the rollout's fields from ARGV[3..15] as
-- rollout_create documents them. A candidate matches when its id matches a
-- device pattern ('*', an exact id, or a prefix ending in '*'), its registry
-- says the rollout's type and its labels hold every wanted label; a
-- matching candidate gets its command, `held` (not in the device's queue,
-- no timers) with its first history entry and a `queued` event, unless the
-- command exists already (a retried call creates nothing twice). Returns
-- the ids of the matching candidates, in order.
local function add_candidates(kfirst, afirst)
  local rid, typ = ARGV[3], ARGV[4]
  local want, pats = nil, nil
  if ARGV[5] ~= '' then want = cjson.decode(ARGV[5]) end
  if ARGV[6] ~= '' then pats = cjson.decode(ARGV[6]) end
  local function allowed(dev)
    if not pats then return true end
    for _, p in ipairs(pats) do
      if p == '*' or p == dev then return true end
      if string.sub(p, -1) == '*' and string.sub(dev, 1, #p - 1) == string.sub(p, 1, -2) then return true end
    end
    return false
  end
  local ids = {}
  for i = afirst, #ARGV, 2 do
    local dev, id = ARGV[i], ARGV[i + 1]
    local dk = kfirst + 2 * (i - afirst)
    local ok = allowed(dev) and redis.call('HGET', KEYS[dk], 'type') == typ
    if ok and want then
      local l = redis.call('HGET', KEYS[dk], 'labels')
      local have = l and cjson.decode(l) or {}
      for lk, v in pairs(want) do if have[lk] ~= v then ok = false; break end end
    end
    if ok then
      ids[#ids + 1] = id
      local k = {cmd = KEYS[dk + 2], log = KEYS[dk + 3], dev = KEYS[dk]}
      if redis.call('EXISTS', k.cmd) == 0 then
        redis.call('HSET', k.cmd, 'id', id, 'device', dev, 'type', typ, 'name', ARGV[7],
          'params', ARGV[8], 'status', 'queued', 'attempt', 0, 'max_attempts', ARGV[12],
          'ack_timeout_s', ARGV[9], 'timeout_s', ARGV[10], 'ttl_s', ARGV[11], 'created_at', now,
          'updated_at', now, 'owner', ARGV[15], 'rollout', rid, 'held', 1)
        redis.call('ZADD', KEYS[dk + 1], nextseq(k, KEYS[dk + 1]), id)
        hist(k, '{"status":"queued","at":' .. now .. '}')
        event({id = id, device = dev, type = typ, name = ARGV[7], attempt = '0'}, k, 'queued')
      end
    end
  end
  return ids
end
