/*
 * migrate.h - the key-layout migration run at start (docs/streams.md "The
 * layout version and the migration"): on one Redis that holds layout 2
 * (iot:layout = 2), before the Redis bus starts, the hub renames the keys
 * of layout 2 to their layout-3 names in bounded batches, over its own
 * synchronous connection, then sets iot:{hub}:layout (and the tombstone
 * iot:layout) to 3. A Redis Cluster never held layout 2 (it refused
 * clusters): nothing to do there.
 *
 * The migration is a list of steps, in one place (hub_migrate_2to3 in
 * migrate.c), each a function of this type. A step must be idempotent and
 * resumable (a hub killed half-way runs every step again at its next
 * start: the layout stays 2 until every step returned 0), must write only
 * with bounded batches (hub_migrate_scan hands at most HUB_MIGRATE_BATCH
 * keys at a time) and never touch a key of layout 3 it did not move.
 * Steps: ctl_migrate_2to3 (hub/migrate.c: registry, leases, commands,
 * rollouts). The ingest keys (telemetry, feed, gateway windows) are moved
 * by the ingest module itself once connected and before its first store
 * (ingest_migrate_2to3 in hub/ingest.c, asynchronous and idempotent,
 * recorded in iot:ingest).
 */
#ifndef HUB_MIGRATE_H
#define HUB_MIGRATE_H

#include <stdbool.h>
#include <stddef.h>
#include <hiredis/hiredis.h>

struct hub;

#define HUB_MIGRATE_BATCH 500

struct hub_migrate {
	redisContext *c;           /* synchronous, to the one Redis (db selected) */
	long long moved;           /* keys renamed or rewritten, for the log */
	char err[256];             /* why a step failed */
};

/* A step: 0 done, -1 failed (m->err says why; the hub exits 1). */
typedef int (*hub_migrate_step)(struct hub_migrate *m);

/* The steps of 2 -> 3, in order (NULL-terminated name/step pairs). */
struct hub_migrate_stepdef {
	const char *name;
	hub_migrate_step fn;
};
extern const struct hub_migrate_stepdef hub_migrate_2to3[];


/* Helpers for steps. hub_migrate_scan: SCAN MATCH pattern (COUNT
 * HUB_MIGRATE_BATCH) over the whole keyspace; each(m, keys, n, arg) gets
 * every batch (at most HUB_MIGRATE_BATCH keys, may repeat a key, may
 * include keys the step renamed itself); a non-zero return stops. */
int hub_migrate_scan(struct hub_migrate *m, const char *pattern,
		     int (*each)(struct hub_migrate *m, char **keys, size_t n, void *arg),
		     void *arg);
/* A command, its reply (freeReplyObject it), NULL with m->err set when
 * the connection failed. An error reply is returned as is. */
redisReply *hub_migrate_cmd(struct hub_migrate *m, int argc, const char **argv,
			    const size_t *argvlen);
/* RENAMENX from to: 0 renamed or from is gone (already moved), -1 error
 * or to exists beside from (a conflict: m->err). */
int hub_migrate_rename(struct hub_migrate *m, const char *from, const char *to);

/* At start, before the bus: migrates a single Redis of layout 2, and marks
 * a fresh single Redis as layout 3. 0 ok (or Redis not reachable now: the
 * layout gate checks later), -1 failed (logged; exit 1). */
int hub_migrate_start(struct hub *hub);

#endif
