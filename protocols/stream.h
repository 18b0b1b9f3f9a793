/*
 * stream.h - the `iot-dashboard.v1` lws protocol (CONTRACT §3,
 * docs/dashboard.md): auth, subscriptions with filters, live fan-out from
 * Redis pub/sub with shared message bodies, `since` replay from the feed,
 * aggregates, presence and command status, bounded per-connection queues.
 */
#ifndef HUB_STREAM_H
#define HUB_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <libwebsockets.h>

#include "hub/auth.h"
#include "protocols/agg.h"

struct hub;

#define STREAM_SUBPROTOCOL "iot-dashboard.v1"
#define STREAM_PATH "/v1/stream"

/* Registers the WebSocket endpoint (STREAM_PATH) with hub/http.c. Start-up. */
void stream_register(void);

void stream_init(struct hub *hub);
void stream_stop(struct hub *hub);  /* timers: in the drain, before the loop ends */
void stream_free(struct hub *hub);  /* memory: after the loop is destroyed */

/* Shutdown: closes every dashboard with 1001. */
void stream_close_all(struct hub *hub);

/* Delivers merged aggregates of window w starting at start (called by agg). */
void stream_emit_aggregates(struct hub *hub, enum agg_window w, int64_t start,
			    struct agg_state **v, size_t n);

extern const struct lws_protocols stream_protocol;

#endif
