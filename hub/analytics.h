/*
 * analytics.h - GET /v1/aggregates (docs/analytics.md): aggregates of one
 * numeric field over 1m/1h/1d buckets, read from the rollups
 * (hub/rollup.h), for the devices a selector picks, optionally grouped by
 * a label; answered from a Redis cache when an identical query ran within
 * aggregates-cache-ttl-ms, computed once across instances otherwise
 * (single-flight on a Redis lock), and limited per API key by its usage
 * tier (api-tiers: a request rate counted in Redis, a longest range).
 */
#ifndef HUB_ANALYTICS_H
#define HUB_ANALYTICS_H

struct hub_module;

extern const struct hub_module hub_analytics_module;

#endif
