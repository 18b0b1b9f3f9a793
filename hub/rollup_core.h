/*
 * rollup_core.h - the pure part of the rollups and the analytics API
 * (docs/analytics.md): the mergeable partial aggregate, its text form in
 * Redis, bucket arithmetic per granularity, and the usage-tier table.
 * No lws, no hiredis: unit-tested alone (tests/unit/test_rollup.c).
 */
#ifndef HUB_ROLLUP_CORE_H
#define HUB_ROLLUP_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/util.h"

/* A partial aggregate of one numeric field over some readings. Every piece
 * merges associatively and commutatively (first/last break ties on the
 * value), so the merge of partials is the same whatever order they come
 * in: across flushes, instances and ingest shards. count 0 = empty. */
struct ru_part {
	int64_t count;
	double sum, sumsq, min, max;
	int64_t first_ts, last_ts;
	double first, last;
};

/* Folds one value v at ts (ms) into p. Non-finite values are ignored. */
void ru_part_add(struct ru_part *p, double v, int64_t ts);
/* Merges src into dst. */
void ru_part_merge(struct ru_part *dst, const struct ru_part *src);

/* The text form kept in Redis and exchanged with the scripts:
 * "count sum sumsq min max first_ts first last_ts last", doubles exact
 * (%.17g or shorter when it reads back equal). Appends to out. */
void ru_part_format(const struct ru_part *p, hub_buf *out);
/* Parses the text form of s[0..len); 0 or -1 (p undefined). */
int ru_part_parse(const char *s, size_t len, struct ru_part *p);

/* Mean and population standard deviation of a non-empty partial. */
double ru_part_mean(const struct ru_part *p);
double ru_part_stddev(const struct ru_part *p);

enum ru_gran { RU_1M, RU_1H, RU_1D, RU__COUNT };

extern const int64_t ru_gran_ms[RU__COUNT];
extern const char *const ru_gran_names[RU__COUNT];
/* Longest from..to of one query per granularity, ms (docs/analytics.md). */
extern const int64_t ru_gran_max_range_ms[RU__COUNT];

/* The granularity named s ("1m", "1h", "1d"), or -1. */
int ru_gran_parse(const char *s);

/* The start of the bucket of g that holds ts (floor, also before 1970). */
static inline int64_t ru_bucket(int64_t ts, enum ru_gran g)
{
	int64_t span = ru_gran_ms[g];

	return ts - (((ts % span) + span) % span);
}

/* ---- usage tiers ------------------------------------------------------- */

#define RU_TIERS_MAX     8
#define RU_TIER_NAME_MAX 32

struct ru_tier {
	char name[RU_TIER_NAME_MAX + 1];
	int64_t requests;          /* per window; 0 = unlimited */
	int64_t window_ms;
	int64_t max_range_ms;      /* longest from..to of one query */
};

struct ru_tiers {
	struct ru_tier v[RU_TIERS_MAX];
	size_t n;
};

/* Parses "name:requests/window_s:max_range_s[,...]" (e.g.
 * "free:10/1:604800,standard:100/1:7776000"). Names match [a-z0-9_-]{1,32}
 * and are unique. Returns 0, or -1 with a message in err. */
int ru_tiers_parse(const char *spec, struct ru_tiers *out, char *err, size_t errlen);

/* The tier called name, or NULL. */
const struct ru_tier *ru_tiers_find(const struct ru_tiers *t, const char *name);

#endif
