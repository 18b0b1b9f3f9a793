/*
 * feedtrim.h - the feed follows its slowest sink (docs/sink.md "The feed
 * and its sinks"). A consumer group on an ingest shard's feed
 * (iot:feed:{i<k>}) is a registered sink. While a shard's feed has groups,
 * the store script trims it at feed-stream-maxlen + feed-sink-max-lag
 * frames (the hard bound) instead of feed-stream-maxlen, and once a second
 * this module trims it (hub/lua/feedtrim.lua) to the oldest of: the
 * slowest group's position and the oldest entry dashboards keep
 * (feed-stream-maxlen newest frames). A group more than feed-sink-max-lag
 * frames behind is logged and counted (iot_hub_feed_sink_over_bound); the
 * hard bound then trims frames it has not read, which that sink reports as
 * a gap. feed-sink-max-lag 0 turns all of this off (sinks are ignored).
 */
#ifndef HUB_FEEDTRIM_H
#define HUB_FEEDTRIM_H

#include "hub/util.h"

struct hub;
struct hub_module;

extern const struct hub_module hub_feedtrim_module;

/* The MAXLEN the store script gives shard's feed now: 0 (no feed),
 * feed-stream-maxlen when the shard is known to have no sink group, else
 * feed-stream-maxlen + feed-sink-max-lag (also before the first check).
 * Cheap: an array read, for the store path. */
long hub_feedtrim_store_maxlen(const struct hub *hub, unsigned shard);

/* Appends the module's metrics (Prometheus text) to out. */
void hub_feedtrim_expose(const struct hub *hub, hub_buf *out);

#endif
