/*
 * ingest.h - the telemetry store in ingest shards (docs/streams.md "Ingest
 * shards"): the store batch (one call of hub/lua/store.lua per shard per
 * loop turn: hub_store_frame, declared in hub/registry.h), the number of
 * shards this Redis uses (recorded in iot:ingest at first start, so every
 * hub agrees), and the migration of the ingest keys from layout 2.
 */
#ifndef HUB_INGEST_H
#define HUB_INGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/registry.h"

struct hub;
struct hub_module;
struct hub_prov_stamp;

extern const struct hub_module hub_ingest_module;

/* The number of ingest shards (1..HUB_FEED_SHARDS_MAX), or 0 while it is
 * not known yet: Redis has not answered (or the layout-2 migration is
 * still running); asks Redis when it can. Once known it never changes for
 * the life of the process. Callers answer `unavailable` on 0. */
unsigned hub_ingest_shards(struct hub *hub);

/* Whether the frames of gateway can be stored now: its ingest shard is
 * known and Redis answers for it (on a cluster, the primary of the
 * shard's slot: a failed primary makes only its shards unavailable). */
bool hub_ingest_up(struct hub *hub, const char *gateway);

/* How far behind Redis is for gateway's frames (hub_redis_backlog_us of
 * its shard's primary on a cluster): past redis-shed-ms, new frames are
 * answered `unavailable` rather than queued behind the backlog. */
int64_t hub_ingest_backlog_us(struct hub *hub, const char *gateway, int64_t now_us);

/* True when live readings go out on sharded channels (SPUBLISH of
 * iot:live:{i<k>}:raw:<type>: a Redis Cluster); false: classic PUBLISH of
 * iot:live:raw:<type> (one Redis). */
bool hub_ingest_sharded_pubsub(struct hub *hub);

/* The migration of the ingest keys of key layout 2 to layout 3, on one
 * Redis (layout 2 never ran on a cluster): iot:tm:{<d>} -> iot:tm:{i0}:<d>,
 * iot:gw:{<g>}:seqs -> iot:seqs:{i<k>}:<g> (k: the gateway's shard),
 * iot:feed -> iot:feed:{i0} (so feed ids, and the positions dashboards
 * hold, stay valid), each with RENAMENX (TTLs move with the key), found by
 * SCAN in batches of 1,000 keys (one batch's renames answered before the
 * next SCAN). Idempotent and resumable: a key renamed by another hub is
 * skipped, a layout-3 key that exists already is left (logged). When the
 * walk ends, iot:ingest's `migrated` is set and later starts skip it. done
 * runs once: ok false when Redis failed meanwhile (run it again).
 * The hub runs it itself before its first store (hub_ingest_shards stays 0
 * until it is done); the layout gate may call it too. */
void ingest_migrate_2to3(struct hub *hub, unsigned shards, void (*done)(void *arg, bool ok),
			 void *arg);

/* hub_store_frame's queueing, with each reading's provenance stamp (ps:
 * n entries; NULL only while provenance is off). hub/provenance.c calls it
 * for a frame it stamped (and again after a chain-head mismatch). Same
 * contract as hub_store_frame. */
int hub_ingest_enqueue(struct hub *hub, const char *gateway, int64_t seq,
		       const struct hub_store_reading *r, const struct hub_prov_stamp *ps,
		       size_t n, const char *lines, size_t lines_len,
		       const struct hub_store_group *g, size_t ng, hub_redis_cb cb, void *arg);

#endif
