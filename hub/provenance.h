/*
 * provenance.h - tamper-evident history (docs/provenance.md): every stored
 * reading is chained to the previous reading of its device stream by a
 * SHA-256 the hub computes (hub/prov_core.h) against a cached chain head
 * that hub/lua/store.lua compare-and-sets; signed checkpoints (a Merkle
 * root over the heads that changed, Ed25519) every provenance-checkpoint-s;
 * device signatures for types that require them; the routes
 * /v1/provenance/{key,checkpoints,chain/{device}} and
 * PUT /v1/devices/{device}/key.
 *
 * Everything runs on the loop thread; nothing blocks (the key file is read
 * once at start).
 */
#ifndef HUB_PROVENANCE_H
#define HUB_PROVENANCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/prov_core.h"
#include "hub/redis.h"
#include "hub/registry.h"
#include "hub/util.h"
#include "protocols/schema.h"

struct hub;
struct hub_module;

extern const struct hub_module hub_prov_module;

/* A reading's chain stamp: arrival time (ms), position, predecessor and own
 * hash (hex, NUL-terminated). */
struct hub_prov_stamp {
	int64_t at, n;
	char ph[PROV_HEX_LEN + 1], h[PROV_HEX_LEN + 1];
};

/* True when readings are chained (`provenance on`, the default). */
bool hub_prov_on(const struct hub *hub);

/* Appends (RESP) the two provenance KEYS of a store call of shard k: its
 * chain heads and its changed-heads set. */
void hub_prov_shard_keys(hub_buf *resp, unsigned shard);

/* hub_store_frame with provenance on: copies the frame, stamps each reading
 * against the cached heads and queues it (hub_ingest_enqueue); a head
 * mismatch answered by the script is retried here (at most 16 times, then
 * cb gets NULL: `unavailable`), so cb sees only the final answer. Same
 * contract as hub_store_frame. */
int hub_prov_store_frame(struct hub *hub, const char *gateway, int64_t seq,
			 const struct hub_store_reading *r, size_t n,
			 const char *lines, size_t lines_len,
			 const struct hub_store_group *g, size_t ng,
			 hub_redis_cb cb, void *arg);

/* True when the device type requires signed readings (its document has
 * "signed_readings": true). */
bool hub_prov_type_signed(const schema_type *t);

enum hub_prov_sig { HUB_PROV_SIG_OK, HUB_PROV_SIG_BAD, HUB_PROV_SIG_PENDING };

/* Checks a reading's signature (sig: 128 hex digits, NULL when absent)
 * over prov_reading_message(device, ts, data) with the device's registered
 * key. PENDING: the key is being read from Redis (answer the frame
 * `unavailable`); BAD sets *why (static text). */
enum hub_prov_sig hub_prov_check_sig(struct hub *hub, const char *device, size_t dl,
				     const char *ts, size_t tl, const char *data, size_t datal,
				     const char *sig, size_t sl, const char **why);

/* Starts reading the device's key if it is not cached (an announce of a
 * signed type calls it, so the first reading rarely waits). */
void hub_prov_warm(struct hub *hub, const char *device);

#endif
