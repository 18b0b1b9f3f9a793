-- layout: the key-layout check (hub/keys.h), run with EVAL on every
-- (re)connect of a hub before any other command (the Redis bus's gate,
-- hub/main.c) on one Redis: the layout key is set to the hub's version when
-- absent and Redis holds no hub data of an older layout, with the old
-- layout key as a tombstone (so that a layout-2 hub refuses this Redis);
-- data of layout 1 (no layout key while iot:devices or iot:cmd:seq exists),
-- of layout 2 (the hub migrates it at start, hub/migrate.c) or of another
-- version is refused. On a Redis Cluster the call crosses slots
-- (CROSSSLOT) and the gate lets it pass: a cluster never held layout 1 or
-- 2, and lease_renew checks the version there.
--
-- KEYS[1]  iot:{hub}:layout   HUB_LAYOUT_KEY
-- KEYS[2]  iot:layout         the layout-1/2 layout key
-- KEYS[3]  iot:devices        the layout-1/2 device set
-- KEYS[4]  iot:cmd:seq        the layout-1/2 command counter
-- ARGV[1] the hub's layout version (HUB_LAYOUT_VERSION).
--
-- Reply: {1, version}: ours; {0, version}: another layout ('' for layout 1).
-- Errors: none of its own.
local v = redis.call('GET', KEYS[1])
local old = redis.call('GET', KEYS[2])
if not v then
  if old and old ~= ARGV[1] then return {0, old} end
  if not old and redis.call('EXISTS', KEYS[3], KEYS[4]) > 0 then return {0, ''} end
  redis.call('SET', KEYS[1], ARGV[1], 'NX')
  v = ARGV[1]
end
if v == ARGV[1] then
  if not old then redis.call('SET', KEYS[2], ARGV[1]) end
  return {1, v}
end
return {0, v}
