/*
 * rollup.h - rollups at ingest (docs/analytics.md "Rollups"): every
 * instance folds the numeric fields of the readings it stored (it observes
 * HUB_EV_READINGS_STORED, which never fires for a resend Redis already
 * had) into per-(device, field, minute) and per-(device, field, hour)
 * partials, and merges them with calls of hub/lua/rollup_apply.lua per
 * rollup shard: the minutes into the 1m buckets every rollup-flush-ms, the
 * hours into the 1h and 1d buckets every rollup-coarse-flush-ms. A call carries an id: a
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
