-- agg_publish: keeps an instance's 1 s aggregate partials in a stream a
-- little over the longest window plus grace, so that an instance that
-- starts merging (first aggregate subscriber, restart, Redis reconnect)
-- catches up on the windows in progress, and publishes them behind their
-- stream id (the seam between the two, protocols/agg.c).
--
-- KEYS[1]  iot:agg:partials   HUB_KEY_AGG_PARTIALS
-- ARGV[1] channel (HUB_CH_AGG), ARGV[2] MINID (ms: older entries may go),
-- ARGV[3] the partials message (JSON).
--
-- Reply: the entry's stream id.
-- Errors: a MINID that is not a stream id (XADD's error).
local id = redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[2], '*', 'p', ARGV[3])
redis.call('PUBLISH', ARGV[1], id .. '\n' .. ARGV[3])
return id
