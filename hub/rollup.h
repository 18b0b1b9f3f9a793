/*
 * rollup.h - rollups at ingest (docs/analytics.md "Rollups"): every
 * instance folds the numeric fields of the readings it stored (it observes
 * HUB_EV_READINGS_STORED, which never fires for a resend Redis already
 * had) into per-(device, field, bucket) partials for 1m, 1h and 1d
 * buckets, and every rollup-flush-ms merges them into Redis with one call
 * of hub/lua/rollup_apply.lua per rollup shard. A flush carries an id: a
 * resend after a lost reply is merged once. Partials merge associatively,
 * so instances and shards add up to the same buckets.
 *
 * Off with `rollups 0` (nothing is observed or written).
 */
#ifndef HUB_ROLLUP_H
#define HUB_ROLLUP_H

struct hub_module;

extern const struct hub_module hub_rollup_module;

#endif
