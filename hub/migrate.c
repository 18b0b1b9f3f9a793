/*
 * migrate.c - see migrate.h. Layout 2 -> 3 on one Redis, at start.
 */
#include "hub/migrate.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/util.h"

/* Layout-2 names (docs/streams.md, layout 2). */
#define L2_LAYOUT    "iot:layout"
#define L2_DEVICES   "iot:devices"
#define L2_TYPE      "iot:type:"
#define L2_TIMERS    "iot:cmd:timers"
#define L2_SEQ       "iot:cmd:seq"
#define L2_EPOCH     "iot:epoch"
#define L2_LEASES    "iot:leases"
#define L2_ACTIVE    "iot:rollouts:active"
#define LOCK_KEY     "iot:{hub}:migrating"
#define LOCK_MS      "30000"

redisReply *hub_migrate_cmd(struct hub_migrate *m, int argc, const char **argv,
			    const size_t *argvlen)
{
	redisReply *r = redisCommandArgv(m->c, argc, argv, argvlen);

	if (!r)
		snprintf(m->err, sizeof(m->err), "Redis: %s", m->c->errstr);
	return r;
}

/* A command whose reply only matters for errors. */
static int run(struct hub_migrate *m, int argc, const char **argv)
{
	redisReply *r = hub_migrate_cmd(m, argc, argv, NULL);
	int rc = 0;

	if (!r)
		return -1;
	if (r->type == REDIS_REPLY_ERROR) {
		snprintf(m->err, sizeof(m->err), "%s %s: %s", argv[0], argc > 1 ? argv[1] : "",
			 r->str);
		rc = -1;
	}
	freeReplyObject(r);
	return rc;
}

int hub_migrate_rename(struct hub_migrate *m, const char *from, const char *to)
{
	const char *argv[3] = { "RENAMENX", from, to };
	redisReply *r = hub_migrate_cmd(m, 3, argv, NULL);
	int rc = 0;

	if (!r)
		return -1;
	if (r->type == REDIS_REPLY_INTEGER && r->integer == 1) {
		m->moved++;
	} else if (r->type == REDIS_REPLY_INTEGER) {
		snprintf(m->err, sizeof(m->err), "%s and %s both exist: resolve by hand", from, to);
		rc = -1;
	} else if (!(r->type == REDIS_REPLY_ERROR && strstr(r->str, "no such key"))) {
		snprintf(m->err, sizeof(m->err), "RENAMENX %s: %s", from,
			 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
		rc = -1;
	}
	freeReplyObject(r);
	return rc;
}

int hub_migrate_scan(struct hub_migrate *m, const char *pattern,
		     int (*each)(struct hub_migrate *m, char **keys, size_t n, void *arg),
		     void *arg)
{
	char cursor[32] = "0";
	char count[16];

	snprintf(count, sizeof(count), "%d", HUB_MIGRATE_BATCH);
	do {
		const char *argv[6] = { "SCAN", cursor, "MATCH", pattern, "COUNT", count };
		redisReply *r = hub_migrate_cmd(m, 6, argv, NULL);
		char **keys;
		size_t n = 0;
		int rc;

		if (!r)
			return -1;
		if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
		    r->element[1]->type != REDIS_REPLY_ARRAY) {
			snprintf(m->err, sizeof(m->err), "SCAN: unexpected reply");
			freeReplyObject(r);
			return -1;
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		keys = hub_xmalloc((r->element[1]->elements + 1) * sizeof(*keys));
		for (size_t i = 0; i < r->element[1]->elements; i++)
			if (r->element[1]->element[i]->type == REDIS_REPLY_STRING)
				keys[n++] = r->element[1]->element[i]->str;
		rc = n ? each(m, keys, n, arg) : 0;
		free(keys);
		freeReplyObject(r);
		if (rc)
			return rc;
	} while (strcmp(cursor, "0"));
	return 0;
}

/* ---- the control half -------------------------------------------------- */

/* The members of set key, batch by batch (SSCAN), to fn; then key goes. */
static int drain_set(struct hub_migrate *m, const char *key,
		     int (*fn)(struct hub_migrate *m, const char *member, void *arg), void *arg)
{
	char cursor[32] = "0";
	char count[16];

	snprintf(count, sizeof(count), "%d", HUB_MIGRATE_BATCH);
	do {
		const char *argv[5] = { "SSCAN", key, cursor, "COUNT", count };
		redisReply *r = hub_migrate_cmd(m, 5, argv, NULL);
		int rc = 0;

		if (!r)
			return -1;
		if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
			snprintf(m->err, sizeof(m->err), "SSCAN %s: unexpected reply", key);
			freeReplyObject(r);
			return -1;
		}
		snprintf(cursor, sizeof(cursor), "%s", r->element[0]->str);
		for (size_t i = 0; !rc && i < r->element[1]->elements; i++)
			if (r->element[1]->element[i]->type == REDIS_REPLY_STRING)
				rc = fn(m, r->element[1]->element[i]->str, arg);
		freeReplyObject(r);
		if (rc)
			return rc;
	} while (strcmp(cursor, "0"));
	const char *del[2] = { "DEL", key };
	return run(m, 2, del);
}

static int mark_slot(struct hub_migrate *m, unsigned slot)
{
	char s[16];
	const char *argv[4] = { "SETBIT", HUB_KEY_SLOTS, s, "1" };

	snprintf(s, sizeof(s), "%u", slot);
	return run(m, 4, argv);
}

static int device_to_index(struct hub_migrate *m, const char *dev, void *arg)
{
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "SADD", key, dev };

	(void)arg;
	if (!hub_id_valid(dev, strlen(dev)))
		return 0;
	hub_key_idx_devices(key, sizeof(key), hub_dev_slot(dev));
	m->moved++;
	return mark_slot(m, hub_dev_slot(dev)) || run(m, 3, argv);
}

static int device_to_type(struct hub_migrate *m, const char *dev, void *arg)
{
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "SADD", key, dev };

	if (!hub_id_valid(dev, strlen(dev)) ||
	    !hub_key_idx_type(key, sizeof(key), hub_dev_slot(dev), arg))
		return 0;
	m->moved++;
	return run(m, 3, argv);
}

/* iot:type:{<t>} -> iot:idx:{<tag>}:type:<t> per member. */
static int types_batch(struct hub_migrate *m, char **keys, size_t n, void *arg)
{
	(void)arg;
	for (size_t i = 0; i < n; i++) {
		size_t len = strlen(keys[i]), p = sizeof(L2_TYPE) - 1;
		char type[HUB_ID_MAX + 1];

		if (len < p + 3 || keys[i][p] != '{' || keys[i][len - 1] != '}' ||
		    len - p - 2 > HUB_ID_MAX)
			continue;
		memcpy(type, keys[i] + p + 1, len - p - 2);
		type[len - p - 2] = '\0';
		if (drain_set(m, keys[i], device_to_type, type))
			return -1;
	}
	return 0;
}

/* iot:cmd:<id>[:log] -> iot:cmd:{<id>}[:log]; iot:rollout:<id>[:cmds] ->
 * iot:rollout:{<id>}[:cmds]. Layout-3 names (braced) and the fixed
 * iot:cmd:timers / iot:cmd:seq are left. */
static int ids_batch(struct hub_migrate *m, char **keys, size_t n, void *arg)
{
	const char *prefix = arg;
	size_t plen = strlen(prefix);

	for (size_t i = 0; i < n; i++) {
		const char *k = keys[i], *id = k + plen, *sfx;
		char to[HUB_KEY_MAX], idbuf[HUB_ID_MAX + 1];
		size_t idlen;

		if (strchr(k, '{') || !strcmp(k, L2_TIMERS) || !strcmp(k, L2_SEQ))
			continue;
		sfx = strchr(id, ':');
		idlen = sfx ? (size_t)(sfx - id) : strlen(id);
		if (!idlen || idlen > HUB_ID_MAX)
			continue;
		memcpy(idbuf, id, idlen);
		idbuf[idlen] = '\0';
		snprintf(to, sizeof(to), "%s{%s}%s", prefix, idbuf, sfx ? sfx : "");
		if (hub_migrate_rename(m, k, to))
			return -1;
	}
	return 0;
}

/* Each entry of iot:cmd:timers goes to its device's slot's timers. */
static int timers(struct hub_migrate *m)
{
	for (;;) {
		const char *argv[5] = { "ZRANGE", L2_TIMERS, "0", "199", "WITHSCORES" };
		redisReply *r = hub_migrate_cmd(m, 5, argv, NULL);

		if (!r)
			return -1;
		if (r->type != REDIS_REPLY_ARRAY) {
			freeReplyObject(r);
			snprintf(m->err, sizeof(m->err), "ZRANGE " L2_TIMERS ": unexpected reply");
			return -1;
		}
		if (!r->elements) {
			freeReplyObject(r);
			break;
		}
		for (size_t i = 0; i + 1 < r->elements; i += 2) {
			const char *id = r->element[i]->str, *score = r->element[i + 1]->str;
			char key[HUB_KEY_MAX], tk[HUB_KEY_MAX];
			const char *hg[3] = { "HGET", key, "device" };
			redisReply *d;

			hub_key_cmd(key, sizeof(key), id);
			if (!(d = hub_migrate_cmd(m, 3, hg, NULL))) {
				freeReplyObject(r);
				return -1;
			}
			if (d->type == REDIS_REPLY_STRING && hub_id_valid(d->str, d->len)) {
				/* Timers live in the slot of the command's id (a
				 * layout-2 id is not in its device's slot): that
				 * slot is marked for the sweep. */
				unsigned slot = hub_crc16(id, strlen(id)) & (HUB_SLOTS - 1);
				const char *za[4] = { "ZADD", tk, score, id };
				hub_key_idx_timers(tk, sizeof(tk), slot);
				if (mark_slot(m, slot) || run(m, 4, za)) {
					freeReplyObject(d);
					freeReplyObject(r);
					return -1;
				}
			}
			freeReplyObject(d);
			const char *zr[3] = { "ZREM", L2_TIMERS, id };
			if (run(m, 3, zr)) {
				freeReplyObject(r);
				return -1;
			}
			m->moved++;
		}
		freeReplyObject(r);
	}
	return 0;
}

/* iot:idem:{<owner>}:<key> -> iot:idem:{<device>}:{<owner>}:<key>, the
 * device read from the command the key names (its TTL moves with it); a key
 * whose command is gone goes. A layout-3 key (the scan sees the ones it
 * moved) parses as owner <device>, key "{<owner>}:<key>", and its command's
 * device is that owner: left. (A layout-2 key of an API key named like the
 * device, whose Idempotency-Key starts with '{', would be left as well.) */
static int idem_batch(struct hub_migrate *m, char **keys, size_t n, void *arg)
{
	size_t plen = sizeof(HUB_KEY_IDEM) - 1;

	(void)arg;
	for (size_t i = 0; i < n; i++) {
		const char *k = keys[i], *close, *ikey;
		char owner[HUB_ID_MAX + 1], key[HUB_KEY_MAX], to[HUB_KEY_IDEM_MAX];
		const char *get[2] = { "GET", k };
		const char *hg[3] = { "HGET", key, "device" };
		redisReply *id, *dev;
		size_t olen;
		int rc = 0;

		if (strncmp(k, HUB_KEY_IDEM "{", plen + 1) || !(close = strchr(k + plen + 1, '}')) ||
		    close[1] != ':' || !close[2])
			continue;
		olen = (size_t)(close - (k + plen + 1));
		if (olen > HUB_ID_MAX)
			continue;
		memcpy(owner, k + plen + 1, olen);
		owner[olen] = '\0';
		ikey = close + 2;
		if (!(id = hub_migrate_cmd(m, 2, get, NULL)))
			return -1;
		if (id->type != REDIS_REPLY_STRING || !hub_key_cmd(key, sizeof(key), id->str)) {
			freeReplyObject(id);
			continue;
		}
		freeReplyObject(id);
		if (!(dev = hub_migrate_cmd(m, 3, hg, NULL)))
			return -1;
		if (dev->type != REDIS_REPLY_STRING || !hub_id_valid(dev->str, dev->len)) {
			const char *del[2] = { "DEL", k };
			rc = run(m, 2, del); /* its command is gone */
		} else if (!(ikey[0] == '{' && !strcmp(dev->str, owner))) {
			if (hub_key_idem(to, sizeof(to), dev->str, owner, ikey))
				rc = hub_migrate_rename(m, k, to);
		}
		freeReplyObject(dev);
		if (rc)
			return -1;
	}
	return 0;
}

static int device_to_run(struct hub_migrate *m, const char *dev, void *arg)
{
	const char *runid = arg;
	char key[HUB_KEY_MAX], bits[HUB_KEY_MAX], s[16];
	const char *sadd[3] = { "SADD", key, dev };
	const char *setbit[4] = { "SETBIT", bits, s, "1" };
	unsigned slot;

	if (!hub_id_valid(dev, strlen(dev)))
		return 0;
	slot = hub_dev_slot(dev);
	snprintf(s, sizeof(s), "%u", slot);
	if (!hub_key_idx_run(key, sizeof(key), slot, runid) ||
	    !hub_key_runslots(bits, sizeof(bits), runid))
		return 0;
	m->moved++;
	/* The bit first: a set is never written where no reaper looks. */
	return run(m, 4, setbit) || run(m, 3, sadd);
}

/* iot:inst:{<instance>}:<token> (a run's online devices) -> the run's
 * slot-local sets iot:idx:{<tag>}:run:<instance>:<token>, each slot marked
 * in iot:{hub}:runslots:<instance>:<token>: a reaper of the run finds them
 * (its lease moved to iot:{hub}:leases). */
static int runs_batch(struct hub_migrate *m, char **keys, size_t n, void *arg)
{
	size_t plen = sizeof(HUB_KEY_INST) - 1;

	(void)arg;
	for (size_t i = 0; i < n; i++) {
		const char *k = keys[i], *close = strchr(k + plen, '}');
		char runid[HUB_ID_MAX + 2 + HUB_RUN_TOKEN_LEN];
		size_t ilen;

		if (!close || close[1] != ':' || k[plen] != '{')
			continue;
		ilen = (size_t)(close - (k + plen + 1));
		if (!ilen || ilen > HUB_ID_MAX || strlen(close + 2) != HUB_RUN_TOKEN_LEN)
			continue;
		snprintf(runid, sizeof(runid), "%.*s:%s", (int)ilen, k + plen + 1, close + 2);
		if (!hub_run_instance_len(runid, strlen(runid)))
			continue;
		if (drain_set(m, k, device_to_run, runid))
			return -1;
	}
	return 0;
}

static int del_batch(struct hub_migrate *m, char **keys, size_t n, void *arg)
{
	(void)arg;
	for (size_t i = 0; i < n; i++) {
		const char *argv[2] = { "DEL", keys[i] };
		if (run(m, 2, argv))
			return -1;
	}
	return 0;
}

static int ctl_migrate_2to3(struct hub_migrate *m)
{
	const char *del_seq[2] = { "DEL", L2_SEQ };

	if (hub_migrate_rename(m, L2_EPOCH, HUB_KEY_EPOCH) ||
	    hub_migrate_rename(m, L2_LEASES, HUB_KEY_LEASES) ||
	    hub_migrate_rename(m, L2_ACTIVE, HUB_KEY_ROLLOUTS_ACTIVE))
		return -1;
	/* Reaper claims are transient (a lease-ttl-ms): dropped. */
	if (hub_migrate_scan(m, "iot:inst:{*}:*:reaper", del_batch, NULL))
		return -1;
	/* Each run's online set -> its slot-local sets, the slots marked. */
	if (hub_migrate_scan(m, HUB_KEY_INST "{*}:*", runs_batch, NULL))
		return -1;
	if (drain_set(m, L2_DEVICES, device_to_index, NULL) ||
	    hub_migrate_scan(m, L2_TYPE "{*}", types_batch, NULL))
		return -1;
	if (hub_migrate_scan(m, HUB_KEY_CMD "*", ids_batch, HUB_KEY_CMD) ||
	    hub_migrate_scan(m, HUB_KEY_ROLLOUT "*", ids_batch, HUB_KEY_ROLLOUT))
		return -1;
	if (timers(m))
		return -1;
	/* Idempotency keys guard repeats for 24 h: scoped per device in layout
	 * 3, each moves to its command's device (a retry across the upgrade
	 * still gets the first command). */
	if (hub_migrate_scan(m, HUB_KEY_IDEM "*", idem_batch, NULL))
		return -1;
	/* Each device's counter starts from its log's highest seq (cmd_create). */
	return run(m, 2, del_seq);
}

const struct hub_migrate_stepdef hub_migrate_2to3[] = {
	{ "control (registry, leases, commands, rollouts)", ctl_migrate_2to3 },
	{ NULL, NULL },
};

/* ---- at start ----------------------------------------------------------- */

static redisReply *get(struct hub_migrate *m, const char *key)
{
	const char *argv[2] = { "GET", key };
	return hub_migrate_cmd(m, 2, argv, NULL);
}

static int migrate(struct hub *hub, struct hub_migrate *m)
{
	for (int tries = 0;; tries++) {
		const char *lock[6] = { "SET", LOCK_KEY, hub->instance_id, "NX", "PX", LOCK_MS };
		redisReply *r = hub_migrate_cmd(m, 6, lock, NULL);
		bool got;

		if (!r)
			return -1;
		got = r->type == REDIS_REPLY_STATUS;
		freeReplyObject(r);
		if (got)
			break;
		/* Another hub migrates: wait for it (it sets the layout). */
		if (!(r = get(m, HUB_LAYOUT_KEY)))
			return -1;
		got = r->type == REDIS_REPLY_STRING;
		freeReplyObject(r);
		if (got)
			return 0;
		if (tries > 600) {
			snprintf(m->err, sizeof(m->err), "another hub holds " LOCK_KEY " for too long");
			return -1;
		}
		usleep(100 * 1000);
	}
	hub_warn("Redis holds key layout 2: migrating it to layout " HUB_LAYOUT_VERSION);
	for (const struct hub_migrate_stepdef *s = hub_migrate_2to3; s->name; s++) {
		long long before = m->moved;
		if (s->fn(m)) {
			hub_err("layout migration, step %s: %s", s->name, m->err);
			return -1;
		}
		hub_info("layout migration: %s: %lld keys moved", s->name, m->moved - before);
	}
	const char *set3[3] = { "SET", HUB_LAYOUT_KEY, HUB_LAYOUT_VERSION };
	const char *set2[3] = { "SET", L2_LAYOUT, HUB_LAYOUT_VERSION };
	const char *unlock[2] = { "DEL", LOCK_KEY };
	if (run(m, 3, set3) || run(m, 3, set2) || run(m, 2, unlock))
		return -1;
	hub_warn("key layout migrated to " HUB_LAYOUT_VERSION);
	return 0;
}

int hub_migrate_start(struct hub *hub)
{
	const struct hub_config *cfg = &hub->cfg;
	struct timeval tv = { cfg->redis_timeout_ms / 1000, (cfg->redis_timeout_ms % 1000) * 1000 };
	struct hub_migrate m = { 0 };
	redisReply *r;
	int rc = 0;

	m.c = redisConnectWithTimeout(cfg->redis_seeds[0].host, cfg->redis_seeds[0].port, tv);
	if (!m.c || m.c->err)
		goto out; /* not reachable now: the layout gate checks when it is */
	redisSetTimeout(m.c, (struct timeval){ 30, 0 });
	if (cfg->redis_password) {
		const char *argv[2] = { "AUTH", cfg->redis_password };
		if (run(&m, 2, argv))
			goto out;
	}
	{
		const char *argv[2] = { "INFO", "cluster" };
		if (!(r = hub_migrate_cmd(&m, 2, argv, NULL)))
			goto out;
		bool cluster = r->type == REDIS_REPLY_STRING && strstr(r->str, "cluster_enabled:1");
		freeReplyObject(r);
		if (cluster)
			goto out; /* never held layout 2 */
	}
	if (cfg->redis_db) {
		char db[16];
		const char *argv[2] = { "SELECT", db };
		snprintf(db, sizeof(db), "%d", cfg->redis_db);
		if (run(&m, 2, argv))
			goto out;
	}
	if (!(r = get(&m, L2_LAYOUT)))
		goto out;
	bool l2 = r->type == REDIS_REPLY_STRING && !strcmp(r->str, "2");
	freeReplyObject(r);
	if (!l2)
		goto out;
	if (!(r = get(&m, HUB_LAYOUT_KEY)))
		goto out;
	bool have3 = r->type == REDIS_REPLY_STRING;
	freeReplyObject(r);
	if (have3)
		goto out; /* the layout gate tells the two apart */
	if (migrate(hub, &m)) {
		if (m.err[0])
			hub_err("key layout migration 2 -> " HUB_LAYOUT_VERSION " failed: %s", m.err);
		rc = -1;
	}
out:
	if (m.c)
		redisFree(m.c);
	return rc;
}
