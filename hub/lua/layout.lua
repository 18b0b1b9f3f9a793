-- layout: the key-layout check (hub/keys.h), run with EVAL on every
-- (re)connect of a hub before any other command (the Redis bus's gate,
-- hub/main.c): the layout key is set to the hub's version when absent and
-- Redis holds no hub data; data of layout 1 (no layout key while
-- iot:devices or iot:cmd:seq exists) or of another version is refused.
--
-- KEYS[1]  iot:layout    HUB_LAYOUT_KEY
-- KEYS[2]  iot:devices   HUB_KEY_DEVICES
-- KEYS[3]  iot:cmd:seq   HUB_KEY_CMD_SEQ
-- ARGV[1] the hub's layout version (HUB_LAYOUT_VERSION).
--
-- Reply: {1, version}: ours; {0, version}: another layout ('' for layout 1).
-- Errors: none of its own.
local v = redis.call('GET', KEYS[1])
if not v then
  if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then return {0, ''} end
  redis.call('SET', KEYS[1], ARGV[1], 'NX')
  return {1, ARGV[1]}
end
if v == ARGV[1] then return {1, v} end
return {0, v}
