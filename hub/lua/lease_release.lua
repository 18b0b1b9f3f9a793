-- lease_release: a hub run shuts down and gives its lease up: the lease
-- (and the run's slot bitmap) is removed when the run holds no device
-- online any more, else kept, expired (score 0), so that a reaper marks
-- those devices offline (docs/streams.md "Instance leases").
--
-- KEYS[1]  iot:{hub}:leases                       HUB_KEY_LEASES
-- KEYS[2]  iot:{hub}:runslots:<instance>:<token>  hub_key_runslots: the
--                                                 slots of the run's sets
-- then, on one Redis, the run's set iot:idx:{<tag>}:run:<run>
-- (hub_key_idx_run) of every slot marked in KEYS[2]; none on a cluster,
-- where the caller checked them slot by slot (ARGV[2]).
-- ARGV[1] run id, ARGV[2] how many of the run's sets the caller found
-- non-empty.
--
-- Reply: 1 removed, 0 kept expired (or there was none).
-- Errors: none of its own.
local held = tonumber(ARGV[2]) or 1
for i = 3, #KEYS do
  held = held + redis.call('EXISTS', KEYS[i])
end
if held == 0 then
  redis.call('DEL', KEYS[2])
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[1])
return 0
