/*
 * stream.h - the `iot-dashboard.v1` WebSocket flow (docs/dashboard.md): auth, subscriptions with filters, live fan-out from
 * Redis pub/sub with shared message bodies, `since` replay from the feed,
 * aggregates, presence and command status, bounded per-connection queues.
 */
#ifndef HUB_STREAM_H
#define HUB_STREAM_H

#define STREAM_SUBPROTOCOL "iot-dashboard.v1"
#define STREAM_PATH "/v1/stream"

/* The module (hub/module.h): the WebSocket endpoint STREAM_PATH; needs the
 * agg module (its merged windows go to aggregate subscribers). */
struct hub_module;
extern const struct hub_module stream_module;

#endif
