/*
 * listener.h - the hub's own SO_REUSEPORT listening socket. Several iot-hub
 * processes on one port each own a listener and the kernel spreads
 * connections between them (lws 4.1.6 sets SO_REUSEPORT only for multi-thread
 * contexts: docs/pitfalls.md). The socket is adopted into lws as a raw file; on
 * readable the hub accept4()s and hands each socket to the vhost, which does
 * TLS and HTTP/WebSocket as if lws had accepted it.
 */
#ifndef HUB_LISTENER_H
#define HUB_LISTENER_H

#include <stddef.h>

struct hub;
struct hub_listener;

/* Binds and listens on cfg listen address (before lws exists, so a busy port
 * fails start-up with a clear line). Returns NULL with err filled. */
struct hub_listener *hub_listener_open(struct hub *hub, char *err, size_t errlen);

/* Adopts the socket into hub->vh; returns 0 or -1. */
int hub_listener_start(struct hub_listener *l);

/* The bound port (useful with port 0). */
int hub_listener_port(const struct hub_listener *l);

/* Stops accepting (closes the socket). NULL-safe, idempotent. */
void hub_listener_close(struct hub_listener *l);
void hub_listener_free(struct hub_listener *l);

extern const struct lws_protocols hub_listener_protocol;

#endif
