/*
 * api.h - the operator API's read routes over the registry and the telemetry
 * streams: GET /v1/devices, /v1/devices/{device}, /v1/devices/{device}/telemetry
 * (docs/protocol.md "Devices and telemetry", docs/openapi.json). They answer
 * from Redis reply callbacks through struct hub_req (hub/http.h); api.c has
 * no lws include.
 */
#ifndef HUB_API_H
#define HUB_API_H

#include "hub/http.h"

/* The module (hub/module.h): registers the routes. */
extern const struct hub_module hub_api_module;

#endif
