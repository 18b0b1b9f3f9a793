/*
 * http.h - protocols[0]: plain HTTP routes (/healthz, /readyz, /metrics,
 * /v1/device-types), the WebSocket upgrade gate (path, subprotocol, JWT, mTLS
 * client-certificate CN), and the loop's wake-ups (signals).
 */
#ifndef HUB_HTTP_H
#define HUB_HTTP_H

#include <libwebsockets.h>

extern const struct lws_protocols hub_http_protocol;

#endif
