/*
 * ops.h - what operators and their tools read without touching devices:
 * GET /healthz, /readyz, /metrics, /v1/openapi.json (public), the schema
 * registry at /v1/device-types (telemetry:read), and the browser dashboard's
 * files from web-root for any other GET.
 */
#ifndef HUB_OPS_H
#define HUB_OPS_H

/* The module (hub/module.h): registers the routes (and the web-root
 * fallback when web-root is set). */
extern const struct hub_module hub_ops_module;

#endif
