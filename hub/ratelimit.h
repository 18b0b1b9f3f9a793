/*
 * ratelimit.h - token buckets for per-device and per-gateway rates (readings,
 * announces, command acks). 16 bytes per bucket; rate and burst are passed
 * in so a config reload applies to existing buckets at once.
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

/* A bucket as one number that several holders can merge: its theoretical
 * arrival time (GCRA), the wall-clock ms at which it will be full again.
 * TAT <= now means full; of two states of the same limit the later TAT is
 * the more restrictive, so merging is max(). Used to carry a limit across
 * reconnects and instances through Redis (docs/protocol.md).
 * hub_bucket_tat_ms: the bucket's TAT at (now_us monotonic, now_ms wall).
 * hub_bucket_merge_tat: makes the bucket at least as empty as tat_ms says. */
int64_t hub_bucket_tat_ms(const hub_bucket *b, double rate, double burst,
			  int64_t now_us, int64_t now_ms);
void hub_bucket_merge_tat(hub_bucket *b, int64_t tat_ms, double rate, double burst,
			  int64_t now_us, int64_t now_ms);

#endif
