/*
 * ingest.c - the telemetry store in ingest shards (docs/streams.md "Ingest
 * shards"). A gateway's frames go to shard hub_ingest_shard_of(gateway, N);
 * every key of a frame carries that shard's hash tag, so one call of
 * hub/lua/store.lua per shard stores a batch atomically (dedupe, device
 * streams, the shard's feed, the live publish) in one Redis Cluster slot.
 * The frames of one loop turn are batched per shard; with one shard (one
 * Redis) that is exactly the one batch per loop turn the hub always sent.
 *
 * N is recorded in iot:ingest (HSETNX shards) by the first hub, and every
 * hub uses the recorded value; until Redis answered, stores are refused
 * (`unavailable`). On one Redis the ingest keys of layout 2 are renamed
 * first (ingest_migrate_2to3).
 */
#include "hub/ingest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>

#include "hub/events.h"
#include "hub/feedtrim.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/provenance.h"
#include "hub/slot.h"
#include "hub/registry.h"
#include "hub/util.h"
#include "hub_lua.h"

#define RESP_KEEP_MAX   (256 * 1024)  /* a larger command's buffer is not kept */

#define BATCH_FRAMES    64
#define BATCH_READINGS  2048
#define BATCH_BYTES     (512 * 1024)
#define BATCH_LATE_US   1000          /* the writeable never came: flush anyway */
#define LEARN_RETRY_US  (500 * 1000)
#define SHARDS_CLUSTER  16            /* feed-shards 0 on a cluster */
#define MIGRATE_COUNT   "1000"

struct batch_cb {
	hub_redis_cb cb;
	void *arg;
};

/* The frames of one shard waiting for the next store call. */
struct store_batch {
	hub_buf keys, args;        /* RESP of KEYS[2..] and of the frames' ARGV */
	size_t nframes, nkeys, nargs, nreadings, cap;
	struct batch_cb *cbs;
};

enum learn_state { L_IDLE, L_ASKING, L_MIGRATING, L_KNOWN };

struct hub_ingest {
	struct hub *hub;
	int script_store;
	hub_buf resp;              /* the command being built */
	struct store_batch batch[HUB_FEED_SHARDS_MAX];
	size_t pending;            /* frames in all batches */
	lws_sorted_usec_list_t sul_late, sul_learn;
	unsigned shards;           /* 0: not known yet */
	bool sharded_pubsub;
	enum learn_state learn;
	unsigned learn_gen;        /* bumps on stop: stale replies are ignored */
};

/* ---- the store batch ------------------------------------------------------ */

struct batch_sent {
	size_t n;
	struct batch_cb cbs[];
};

static void on_batch(redisReply *reply, void *arg)
{
	struct batch_sent *bs = arg;

	for (size_t i = 0; i < bs->n; i++) {
		redisReply *one = reply;
		if (reply && reply->type == REDIS_REPLY_ARRAY)
			one = i < reply->elements ? reply->element[i] : NULL;
		bs->cbs[i].cb(one, bs->cbs[i].arg);
	}
	free(bs);
}

static void batch_flush(struct hub_ingest *in, unsigned shard)
{
	struct store_batch *B = &in->batch[shard];
	struct hub *hub = in->hub;
	struct batch_sent *bs;
	char key[HUB_KEY_MAX], head[16];
	size_t klen = hub_key_feed(key, sizeof(key), shard);
	int hlen = in->shards > 1 ? snprintf(head, sizeof(head), "%u/", shard) : 0;
	bool prov = hub_prov_on(hub);
	int rc;

	if (!B->nframes)
		return;
	bs = hub_xmalloc(sizeof(*bs) + B->nframes * sizeof(bs->cbs[0]));
	bs->n = B->nframes;
	memcpy(bs->cbs, B->cbs, B->nframes * sizeof(bs->cbs[0]));
	in->resp.len = 0;
	hub_resp_head(&in->resp, 3 + 1 + B->nkeys + (prov ? 2 : 0) + 7 + B->nargs);
	hub_resp_evalsha(&in->resp, hub->redis, in->script_store, 1 + B->nkeys + (prov ? 2 : 0));
	hub_resp_arg(&in->resp, key, klen);
	hub_buf_append(&in->resp, B->keys.data, B->keys.len);
	if (prov) /* the shard's chain heads and changed heads (docs/provenance.md) */
		hub_prov_shard_keys(&in->resp, shard);
	hub_resp_int(&in->resp, hub->cfg.seq_window);
	hub_resp_int(&in->resp, hub->cfg.device_stream_maxlen);
	hub_resp_int(&in->resp, hub_feedtrim_store_maxlen(hub, shard));
	hub_resp_int(&in->resp, (int64_t)B->nframes);
	if (in->sharded_pubsub)
		hub_resp_arg(&in->resp, "SPUBLISH", 8);
	else
		hub_resp_arg(&in->resp, "PUBLISH", 7);
	hub_resp_arg(&in->resp, head, (size_t)hlen);
	hub_resp_int(&in->resp, prov ? 5 : 0);
	hub_buf_append(&in->resp, B->args.data, B->args.len);
	in->pending -= B->nframes;
	B->nframes = B->nkeys = B->nargs = B->nreadings = 0;
	B->keys.len = B->args.len = 0;
	if (B->args.cap > 2 * BATCH_BYTES)
		hub_buf_free(&B->args);
	if (B->keys.cap > 2 * BATCH_BYTES)
		hub_buf_free(&B->keys);
	/* Durable: with ack-durability replicated, answered after its WAIT.
	 * KEYS[1] (the shard's feed) routes it to the shard's primary. */
	rc = hub_redis_command_durable(hub->redis, on_batch, bs, in->resp.data, in->resp.len);
	if (in->resp.cap > RESP_KEEP_MAX)
		hub_buf_free(&in->resp);
	if (rc)
		on_batch(NULL, bs); /* down: every frame is answered `unavailable` */
}

static void store_flush(void *arg)
{
	struct hub_ingest *in = arg;

	if (!in->pending)
		return;
	lws_sul_cancel(&in->sul_late);
	for (unsigned k = 0; k < in->shards && in->pending; k++)
		batch_flush(in, k);
}

static void store_flush_late(lws_sorted_usec_list_t *sul)
{
	store_flush(lws_container_of(sul, struct hub_ingest, sul_late));
}

/* The slot of gateway's feed shard (of shards), -1 when its key does not fit. */
static int feed_slot(const char *gateway, unsigned shards)
{
	char key[HUB_KEY_MAX];
	size_t n = hub_key_feed(key, sizeof(key), hub_ingest_shard_of(gateway, shards));

	return n ? (int)hub_slot(key, n) : -1;
}

bool hub_ingest_up(struct hub *hub, const char *gateway)
{
	unsigned shards = hub_ingest_shards(hub);
	int slot;

	if (!shards)
		return false;
	if (!hub_redis_cluster(hub->redis))
		return hub_redis_up(hub->redis);
	slot = feed_slot(gateway, shards);
	return slot >= 0 && hub_redis_slot_up(hub->redis, slot);
}

int64_t hub_ingest_backlog_us(struct hub *hub, const char *gateway, int64_t now_us)
{
	unsigned shards = hub_ingest_shards(hub);

	if (!shards || !hub_redis_cluster(hub->redis))
		return hub_redis_backlog_us(hub->redis, -1, now_us);
	return hub_redis_backlog_us(hub->redis, feed_slot(gateway, shards), now_us);
}

int hub_store_frame(struct hub *hub, const char *gateway, int64_t seq,
		    const struct hub_store_reading *r, size_t n,
		    const char *lines, size_t lines_len,
		    const struct hub_store_group *g, size_t ng,
		    hub_redis_cb cb, void *arg)
{
	if (hub_prov_on(hub))
		return hub_prov_store_frame(hub, gateway, seq, r, n, lines, lines_len, g, ng, cb, arg);
	return hub_ingest_enqueue(hub, gateway, seq, r, NULL, n, lines, lines_len, g, ng, cb, arg);
}

int hub_ingest_enqueue(struct hub *hub, const char *gateway, int64_t seq,
		       const struct hub_store_reading *r, const struct hub_prov_stamp *ps,
		       size_t n, const char *lines, size_t lines_len,
		       const struct hub_store_group *g, size_t ng, hub_redis_cb cb, void *arg)
{
	struct hub_ingest *in = hub->ingest;
	unsigned shards = hub_ingest_shards(hub), k;
	struct store_batch *B;
	hub_buf *a, *kb;
	char key[HUB_KEY_MAX];
	size_t klen;

	if (!hub_ingest_up(hub, gateway))
		return -1;
	k = hub_ingest_shard_of(gateway, shards);
	if (!(klen = hub_key_seqs(key, sizeof(key), k, gateway)))
		return -1;
	B = &in->batch[k];
	a = &B->args;
	kb = &B->keys;
	hub_resp_arg(kb, key, klen);
	for (size_t i = 0; i < n; i++)
		hub_resp_arg(kb, key, hub_key_tm_shard(key, sizeof(key), k, r[i].device));
	hub_resp_int(a, seq);
	hub_resp_str(a, gateway);
	hub_resp_arg(a, lines, lines_len);
	hub_resp_int(a, (int64_t)n);
	for (size_t i = 0; i < n; i++) {
		hub_resp_arg(a, r[i].ts, r[i].ts_len);
		hub_resp_arg(a, r[i].data, r[i].data_len);
		if (ps) {
			hub_resp_int(a, ps[i].at);
			hub_resp_int(a, ps[i].n);
			hub_resp_arg(a, ps[i].ph, PROV_HEX_LEN);
			hub_resp_arg(a, ps[i].h, PROV_HEX_LEN);
			hub_resp_arg(a, r[i].sig ? r[i].sig : "", r[i].sig ? r[i].sig_len : 0);
		}
	}
	hub_resp_int(a, (int64_t)ng);
	for (size_t i = 0; i < ng; i++) {
		if (in->sharded_pubsub)
			hub_resp_arg(a, key, hub_ch_raw_shard(key, sizeof(key), k, g[i].type));
		else
			hub_resp_arg(a, key, hub_ch_raw(key, sizeof(key), g[i].type));
		hub_resp_int(a, (int64_t)g[i].off + 1);            /* Lua: 1-based, inclusive */
		hub_resp_int(a, (int64_t)(g[i].off + g[i].len));
	}
	size_t na = 0;
	for (size_t i = 0; i < n; i++)
		na += r[i].anom_len > 0;
	hub_resp_int(a, (int64_t)na);
	for (size_t i = 0; i < n && na; i++)
		if (r[i].anom_len) {
			hub_resp_int(a, (int64_t)i + 1);        /* Lua: 1-based */
			hub_resp_arg(a, r[i].anom, r[i].anom_len);
		}
	B->nkeys += 1 + n;
	B->nargs += 4 + (ps ? 7 : 2) * n + 1 + 3 * ng + 1 + 2 * na;
	if (B->nframes == B->cap) {
		B->cap = B->cap ? B->cap * 2 : 16;
		B->cbs = hub_xrealloc(B->cbs, B->cap * sizeof(*B->cbs));
	}
	B->cbs[B->nframes].cb = cb;
	B->cbs[B->nframes].arg = arg;
	B->nframes++;
	B->nreadings += n;
	if (!in->pending++) {
		hub_redis_want_flush(hub->redis);
		lws_sul_schedule(hub->ctx, 0, &in->sul_late, store_flush_late, BATCH_LATE_US);
	}
	if (B->nframes >= BATCH_FRAMES || B->nreadings >= BATCH_READINGS ||
	    a->len + kb->len >= BATCH_BYTES)
		batch_flush(in, k);
	return 0;
}

/* ---- the shard count -------------------------------------------------------
 * HSETNX iot:ingest shards <configured>, then HMGET shards migrated: the
 * recorded count wins. On one Redis the layout-2 keys are migrated first
 * (once: `migrated`). */

struct learn_op {
	struct hub_ingest *in;
	unsigned gen;
};

static void learn_kick(struct hub_ingest *in);

static void learn_retry(lws_sorted_usec_list_t *sul)
{
	learn_kick(lws_container_of(sul, struct hub_ingest, sul_learn));
}

static void learn_failed(struct hub_ingest *in)
{
	in->learn = L_IDLE;
	lws_sul_schedule(in->hub->ctx, 0, &in->sul_learn, learn_retry, LEARN_RETRY_US);
}

static struct hub_ingest *learn_take(void *arg)
{
	struct learn_op *op = arg;
	struct hub_ingest *in = op->in;
	bool stale = op->gen != in->learn_gen;

	free(op);
	return stale ? NULL : in;
}

static struct learn_op *learn_op(struct hub_ingest *in)
{
	struct learn_op *op = hub_xmalloc(sizeof(*op));

	op->in = in;
	op->gen = in->learn_gen;
	return op;
}

static void learn_known(struct hub_ingest *in, unsigned shards)
{
	in->shards = shards;
	in->sharded_pubsub = hub_redis_cluster(in->hub->redis);
	in->learn = L_KNOWN;
	hub_info("telemetry: %u ingest shard%s (%s)", shards, shards == 1 ? "" : "s",
		 in->sharded_pubsub ? "sharded pub/sub" : "pub/sub");
}

static unsigned learnt_shards;

static void on_migrated_flag(redisReply *reply, void *arg)
{
	struct hub_ingest *in = learn_take(arg);

	if (!in)
		return;
	if (!reply || reply->type == REDIS_REPLY_ERROR) {
		learn_failed(in);
		return;
	}
	learn_known(in, learnt_shards);
}

static void on_migrate_done(void *arg, bool ok)
{
	struct hub_ingest *in = learn_take(arg);
	const char *argv[] = { "HSET", HUB_KEY_INGEST, "migrated", "1" };

	if (!in)
		return;
	if (!ok) {
		learn_failed(in);
		return;
	}
	if (hub_redis_command_argv(in->hub->redis, on_migrated_flag, learn_op(in), 4, argv, NULL))
		learn_failed(in);
}

static void on_learn(redisReply *reply, void *arg)
{
	struct hub_ingest *in = learn_take(arg);
	long long n;
	char *end;

	if (!in)
		return;
	if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
	    reply->element[0]->type != REDIS_REPLY_STRING) {
		if (reply)
			hub_err("telemetry: reading " HUB_KEY_INGEST " failed: %s",
				reply->type == REDIS_REPLY_ERROR ? reply->str : "unexpected reply");
		learn_failed(in);
		return;
	}
	n = strtoll(reply->element[0]->str, &end, 10);
	if (*end || n < 1 || n > HUB_FEED_SHARDS_MAX) {
		hub_err("telemetry: " HUB_KEY_INGEST " holds shards %.32s, not 1..%d: not storing",
			reply->element[0]->str, HUB_FEED_SHARDS_MAX);
		learn_failed(in);
		return;
	}
	if (in->hub->cfg.feed_shards && n != in->hub->cfg.feed_shards)
		hub_warn("telemetry: feed-shards is %d but this Redis was started with %lld "
			 "(" HUB_KEY_INGEST "): using %lld", in->hub->cfg.feed_shards, n, n);
	learnt_shards = (unsigned)n;
	if (hub_redis_cluster(in->hub->redis) ||
	    (reply->element[1]->type == REDIS_REPLY_STRING && !strcmp(reply->element[1]->str, "1"))) {
		learn_known(in, (unsigned)n);
		return;
	}
	in->learn = L_MIGRATING;
	ingest_migrate_2to3(in->hub, (unsigned)n, on_migrate_done, learn_op(in));
}

static void learn_kick(struct hub_ingest *in)
{
	struct hub *hub = in->hub;
	char n[16];

	if (in->learn != L_IDLE || hub->draining)
		return;
	if (!hub_redis_up(hub->redis)) {
		lws_sul_schedule(hub->ctx, 0, &in->sul_learn, learn_retry, LEARN_RETRY_US);
		return;
	}
	snprintf(n, sizeof(n), "%d", hub->cfg.feed_shards ? hub->cfg.feed_shards
				       : hub_redis_cluster(hub->redis) ? SHARDS_CLUSTER : 1);
	const char *a1[] = { "HSETNX", HUB_KEY_INGEST, "shards", n };
	const char *a2[] = { "HMGET", HUB_KEY_INGEST, "shards", "migrated" };
	if (hub_redis_command_argv(hub->redis, NULL, NULL, 4, a1, NULL)) {
		learn_failed(in);
		return;
	}
	in->learn = L_ASKING;
	if (hub_redis_command_argv(hub->redis, on_learn, learn_op(in), 4, a2, NULL))
		learn_failed(in);
}

unsigned hub_ingest_shards(struct hub *hub)
{
	struct hub_ingest *in = hub->ingest;

	if (!in)
		return 0;
	if (!in->shards)
		learn_kick(in);
	return in->shards;
}

bool hub_ingest_sharded_pubsub(struct hub *hub)
{
	return hub->ingest && hub->ingest->sharded_pubsub;
}

static void on_redis_ready(struct hub *hub, enum hub_event ev, const void *payload, void *arg)
{
	(void)ev;
	(void)payload;
	(void)arg;
	hub_ingest_shards(hub);
}

/* ---- layout 2 -> 3 ---------------------------------------------------------- */

struct migrate {
	struct hub *hub;
	unsigned shards;
	void (*done)(void *arg, bool ok);
	void *arg;
	char cursor[32];
	unsigned waiting;          /* renames of this batch not answered yet */
	bool failed;
	unsigned long renamed, conflicts;
};

static void migrate_scan(struct migrate *m);

static void migrate_end(struct migrate *m, bool ok)
{
	if (ok && (m->renamed || m->conflicts))
		hub_info("telemetry: %lu key%s of layout 2 renamed to layout 3 (%lu left: their "
			 "new name exists)", m->renamed, m->renamed == 1 ? "" : "s", m->conflicts);
	m->done(m->arg, ok);
	free(m);
}

static void migrate_batch_done(struct migrate *m)
{
	if (m->failed) {
		migrate_end(m, false);
		return;
	}
	if (!strcmp(m->cursor, "0")) {
		migrate_end(m, true);
		return;
	}
	migrate_scan(m);
}

struct rename_op {
	struct migrate *m;
	char from[HUB_KEY_MAX], to[HUB_KEY_MAX];
};

static void on_rename(redisReply *reply, void *arg)
{
	struct rename_op *op = arg;
	struct migrate *m = op->m;

	if (!reply)
		m->failed = true;
	else if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 1)
		m->renamed++;
	else if (reply->type == REDIS_REPLY_INTEGER) {
		m->conflicts++;
		hub_warn("telemetry: %s exists already: %s (layout 2) left", op->to, op->from);
	}
	/* an error: the key is gone (another hub renamed it): nothing to do */
	free(op);
	if (!--m->waiting)
		migrate_batch_done(m);
}

/* The layout-3 name of a layout-2 ingest key, or 0. */
static size_t migrate_name(const struct migrate *m, const char *key, size_t len, char *to,
			   size_t n)
{
	char name[HUB_ID_MAX + 1];
	size_t pl;

	if (len == sizeof(HUB_KEY_FEED) - 1 && !memcmp(key, HUB_KEY_FEED, len))
		return hub_key_feed(to, n, 0);
	pl = sizeof(HUB_KEY_TM) - 1;
	if (len > pl + 2 && !memcmp(key, HUB_KEY_TM "{", pl + 1) && key[len - 1] == '}' &&
	    len - pl - 2 <= HUB_ID_MAX && !memchr(key + pl + 1, '}', len - pl - 2)) {
		memcpy(name, key + pl + 1, len - pl - 2);
		name[len - pl - 2] = '\0';
		return hub_key_tm_shard(to, n, 0, name);
	}
	pl = sizeof(HUB_KEY_GW) - 1;
	if (len > pl + 7 && !memcmp(key, HUB_KEY_GW "{", pl + 1) &&
	    !memcmp(key + len - 6, "}:seqs", 6) && len - pl - 7 <= HUB_ID_MAX &&
	    !memchr(key + pl + 1, '}', len - pl - 7)) {
		memcpy(name, key + pl + 1, len - pl - 7);
		name[len - pl - 7] = '\0';
		return hub_key_seqs(to, n, hub_ingest_shard_of(name, m->shards), name);
	}
	return 0;
}

static void on_scan(redisReply *reply, void *arg)
{
	struct migrate *m = arg;
	redisReply *keys;

	if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
	    reply->element[0]->type != REDIS_REPLY_STRING ||
	    (keys = reply->element[1])->type != REDIS_REPLY_ARRAY) {
		if (reply)
			hub_err("telemetry: layout 2 -> 3 migration: SCAN failed: %s",
				reply->type == REDIS_REPLY_ERROR ? reply->str : "unexpected reply");
		migrate_end(m, false);
		return;
	}
	snprintf(m->cursor, sizeof(m->cursor), "%s", reply->element[0]->str);
	m->waiting = 1; /* this function's own share, dropped below */
	for (size_t i = 0; i < keys->elements; i++) {
		const redisReply *k = keys->element[i];
		struct rename_op *op;

		if (k->type != REDIS_REPLY_STRING || k->len >= HUB_KEY_MAX)
			continue;
		op = hub_xmalloc(sizeof(*op));
		op->m = m;
		if (!migrate_name(m, k->str, k->len, op->to, sizeof(op->to))) {
			free(op);
			continue;
		}
		memcpy(op->from, k->str, k->len + 1);
		const char *argv[] = { "RENAMENX", op->from, op->to };
		if (hub_redis_command_argv_shard(m->hub->redis, 0, on_rename, op, 3, argv, NULL)) {
			free(op);
			m->failed = true;
			break;
		}
		m->waiting++;
	}
	if (!--m->waiting)
		migrate_batch_done(m);
}

static void migrate_scan(struct migrate *m)
{
	const char *argv[] = { "SCAN", m->cursor, "MATCH", "iot:*", "COUNT", MIGRATE_COUNT };

	if (hub_redis_command_argv_shard(m->hub->redis, 0, on_scan, m, 6, argv, NULL))
		migrate_end(m, false);
}

void ingest_migrate_2to3(struct hub *hub, unsigned shards, void (*done)(void *arg, bool ok),
			 void *arg)
{
	struct migrate *m = hub_xcalloc(1, sizeof(*m));

	m->hub = hub;
	m->shards = shards ? shards : 1;
	m->done = done;
	m->arg = arg;
	strcpy(m->cursor, "0");
	migrate_scan(m);
}

/* ---- the module ------------------------------------------------------------- */

static int ingest_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_ingest *in = hub_xcalloc(1, sizeof(*in));

	(void)err;
	(void)errlen;
	hub->ingest = in;
	in->hub = hub;
	in->script_store = hub_redis_add_script(hub->redis, hub_lua_store);
	hub_redis_set_flush(hub->redis, store_flush, in);
	hub_observe(hub, HUB_EV_REDIS_READY, on_redis_ready, in);
	return 0;
}

static void ingest_stop(struct hub *hub)
{
	struct hub_ingest *in = hub->ingest;

	if (!in)
		return;
	store_flush(in);
	lws_sul_cancel(&in->sul_late);
	lws_sul_cancel(&in->sul_learn);
}

static void ingest_free(struct hub *hub)
{
	struct hub_ingest *in = hub->ingest;

	if (!in)
		return;
	hub_buf_free(&in->resp);
	for (unsigned k = 0; k < HUB_FEED_SHARDS_MAX; k++) {
		hub_buf_free(&in->batch[k].keys);
		hub_buf_free(&in->batch[k].args);
		free(in->batch[k].cbs);
	}
	free(in);
	hub->ingest = NULL;
}

const struct hub_module hub_ingest_module = {
	.name = "ingest",
	.start = ingest_start,
	.stop = ingest_stop,
	.free = ingest_free,
};
