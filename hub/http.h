/*
 * http.h - protocols[0]: plain HTTP routes (/healthz, /readyz, /metrics,
 * /v1/device-types), the WebSocket upgrade gate (path, subprotocol, JWT, mTLS
 * client-certificate CN), and the loop's wake-ups (signals).
 */
#ifndef HUB_HTTP_H
#define HUB_HTTP_H

#include <libwebsockets.h>

extern const struct lws_protocols hub_http_protocol;

/* Request line plus headers: lws holds at most this much of a request's
 * header block (max_http_header_data); a larger one is answered 431. */
#define HUB_HTTP_HEADER_MAX 16384
/* The URL's path and its query, each: 414 beyond. */
#define HUB_HTTP_URI_MAX 4096

/* Sees every line lws logs before the hub's logger does; returns nonzero
 * when the line is one the HTTP module acts on and should not be logged as
 * an lws error (a request whose headers lws could not hold). */
int hub_http_lws_log(const char *line);

struct hub;
/* Before the loop starts. */
void hub_http_init(struct hub *hub);

#endif
