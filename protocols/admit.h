/*
 * admit.h - whether the hub takes one reading of a telemetry frame: the
 * checks every reading goes through, in their order (docs/protocol.md
 * "Telemetry"), as one pure function shared by the hub and by the benchmark
 * peer bench/peers/lws-bare. Stateful limits (rate limiting) are not here:
 * the hub applies them to what this admits.
 *
 *   1. the reading is well formed                     -> invalid
 *   2. its device was taken over by another connection -> unknown_device
 *   3. an unannounced device outside the token's claim -> unauthorized_device
 *   4. its device was not announced on this connection -> unknown_device
 *   5. ts within [now - skew_past, now + skew_future]  -> clock_skew
 *   6. its device type is still loaded                 -> invalid
 *   7. data validates against the type's schema        -> invalid
 *
 * A refused reading's entry of the ack's `rejected` array is written here,
 * so every refusal reads the same from either program. No lws, no Redis.
 */
#ifndef HUB_ADMIT_H
#define HUB_ADMIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "hub/auth.h"
#include "hub/util.h"
#include "protocols/gw_codec.h"
#include "protocols/schema.h"

/* Why a reading was refused, or HUB_REJ_NONE (0) when it was not; the wire
 * names are hub_reject_names (NULL for HUB_REJ_NONE). */
enum hub_reject_code {
	HUB_REJ_NONE,
	HUB_REJ_INVALID,
	HUB_REJ_UNKNOWN_DEVICE,
	HUB_REJ_UNAUTHORIZED_DEVICE,
	HUB_REJ_RATE_LIMITED,
	HUB_REJ_CLOCK_SKEW,
	HUB_REJ_BAD_SIGNATURE,     /* a signed type's reading failed its check (docs/provenance.md) */
	HUB_REJ__COUNT
};

/* "invalid", "unknown_device", ...; [HUB_REJ_NONE] is NULL. */
extern const char *const hub_reject_names[HUB_REJ__COUNT];

/* Field errors reported per refused reading, at most. */
#define ADMIT_MAX_FIELD_ERRORS 8

/* What the caller knows of a reading's device. */
struct admit_device {
	bool announced;            /* on this connection */
	bool lost;                 /* announced since by another connection */
	const schema_type *type;   /* NULL: its type is no longer loaded */
	const char *type_name;
	void *ref;                 /* the caller's own record, handed back */
};

/* Fills *out for device[0..len). */
typedef void (*admit_lookup_fn)(void *ctx, const char *device, size_t len,
				struct admit_device *out);

struct admit_rules {
	int64_t now_ms;
	int64_t skew_past_ms, skew_future_ms;
	const auth_patterns *claim;   /* the token's devices claim; NULL: any */
	admit_lookup_fn lookup;
	void *ctx;
};

/* Runs the checks on readings[index] (item). Returns HUB_REJ_NONE when the
 * reading is admitted (rd and dev filled), else the code of the first check
 * it failed, with its entry appended to rejected (comma separated, as
 * gw_write_reading_reject). */
enum hub_reject_code admit_reading(const struct admit_rules *rules, json_t *item, size_t index,
				   gw_reading *rd, struct admit_device *dev, hub_buf *rejected);

/* The entry of a reading the caller refuses after admission (rate limited):
 * retry_after_ms tells the gateway when to send it again. */
void admit_reject_rate_limited(hub_buf *rejected, size_t index, const gw_reading *rd,
			       int64_t retry_after_ms);

/* The entry of a reading the caller refuses after admission with code and
 * a message (bad_signature). */
void admit_reject(hub_buf *rejected, size_t index, const gw_reading *rd,
		  enum hub_reject_code code, const char *message);

#endif
