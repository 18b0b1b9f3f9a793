/*
 * ratelimit.h - token buckets for per-device and per-gateway reading rates.
 * 16 bytes per bucket; rate and burst are passed in so a config reload
 * applies to existing buckets at once.
 */
#ifndef HUB_RATELIMIT_H
#define HUB_RATELIMIT_H

#include <stdint.h>

typedef struct hub_bucket {
	double tokens;
	int64_t last_us;
} hub_bucket;

/* Starts full (burst tokens) at now_us. */
void hub_bucket_init(hub_bucket *b, double burst, int64_t now_us);

/* Refills for the time since the last call, then takes n tokens if there are
 * that many. Returns 0 when taken, else the milliseconds (>= 1) until n tokens
 * will be there (n > burst: until a full bucket). rate <= 0 means unlimited. */
int64_t hub_bucket_take(hub_bucket *b, double rate, double burst, double n,
			int64_t now_us);

#endif
