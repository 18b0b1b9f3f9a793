/*
 * gateway.h - the `iot-gateway.v1` lws protocol (CONTRACT §2): announce,
 * telemetry with per-reading validation, acks only after Redis made the
 * readings durable, rate limits, flow control and takeover.
 */
#ifndef HUB_GATEWAY_H
#define HUB_GATEWAY_H

#include <stdbool.h>
#include <libwebsockets.h>

#include "hub/auth.h"

struct hub;

#define GW_SUBPROTOCOL "iot-gateway.v1"
#define GW_PATH "/v1/gateway"

/* The module (hub/module.h): the WebSocket endpoint GW_PATH. */
struct hub_module;
extern const struct hub_module gw_module;

/* Subscribes to cross-instance control messages (takeover) and starts the
 * last_seen flush timer. Start-up. */
void gw_init(struct hub *hub);

/* Stops the timers gw_init() started (shutdown). */
void gw_stop(struct hub *hub);

/* Starts a graceful close of every gateway (shutdown): stop reading, close
 * with 1001 once their in-flight frames are answered. Returns how many
 * gateway connections are still open. */
unsigned gw_drain(struct hub *hub, bool force);

/* For the command channel: the local connection holding device (NULL when
 * none), its id (<instance>:<run token>:<serial>, as in the registry's
 * `conn`), and queueing a hub -> gateway message on it (in order with its
 * other replies). A holder that keeps a connection across callbacks takes a
 * reference. */
struct gw_conn;
struct gw_conn *gw_conn_for_device(struct hub *hub, const char *device);
const char *gw_conn_id(const struct gw_conn *c);
bool gw_conn_has_device(const struct gw_conn *c, const char *device);
void gw_conn_send(struct gw_conn *c, const char *msg, size_t len);
void gw_conn_hold(struct gw_conn *c);
void gw_conn_release(struct gw_conn *c);
bool gw_conn_open(const struct gw_conn *c);
void gw_free_maps(void);

extern const struct lws_protocols gw_protocol;

#endif
