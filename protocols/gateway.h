/*
 * gateway.h - the `iot-gateway.v1` WebSocket flow (docs/protocol.md):
 * announce, telemetry with per-reading admission (protocols/admit.h), acks
 * only after Redis made the readings durable, rate limits, flow control and
 * takeover. Other modules reach its connections through hub/link.h and hear
 * from it through hub/events.h (devices announced, command acks, readings
 * stored); nothing else of it is public.
 */
#ifndef HUB_GATEWAY_H
#define HUB_GATEWAY_H

#define GW_SUBPROTOCOL "iot-gateway.v1"
#define GW_PATH "/v1/gateway"

/* The module (hub/module.h): the WebSocket endpoint GW_PATH, hub->gw. */
struct hub_module;
extern const struct hub_module gw_module;

#endif
