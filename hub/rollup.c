/*
 * rollup.c - rollups at ingest (hub/rollup.h, docs/analytics.md).
 *
 * In memory, two tables of entries, each entry a partial per numeric field
 * (struct ru_part) of one device in one bucket:
 *   fine    one entry per (minute, device), merged into the 1m buckets every
 *           rollup-flush-ms;
 *   coarse  one entry per (hour, device), merged into the 1h bucket and the
 *           1d bucket that holds the hour every rollup-coarse-flush-ms.
 * Each reading is folded into both. Holding the hour's partials for a
 * minute instead of merging them every second divides the script's work
 * (an HGET, a parse and an HSET per partial) by about three.
 *
 * A flush groups a table's entries by rollup shard (hub_ingest_shard_of(
 * device, N)) into script calls of at most CALL_PARTIALS partials each
 * (one call holds Redis for a few ms, not tens) and queues them; at most
 * INFLIGHT_MAX calls are in flight, so the store calls of the readings
 * interleave with them. While the queue is not empty no new flush is built:
 * the tables keep folding. A call that got no reply (Redis lost, timeout)
 * is kept and sent again with the same flush id on the next flush,
 * RETRY_MAX calls and RETRY_FOR_MS at most; the script merges an id once.
 */
#include "hub/rollup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>

#include "hub/events.h"
#include "hub/hub.h"
#include "hub/ingest.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/rollup_core.h"
#include "hub/strmap.h"
#include "hub_lua.h"

#define CALL_PARTIALS   1000              /* (device, field, bucket) partials per script call */
#define INFLIGHT_MAX    2                 /* script calls sent and not answered */
#define RETRY_MAX       64                /* unanswered calls kept for a resend */
#define RETRY_FOR_MS    (5 * 60 * 1000)   /* ... for at most this long */
#define APPLIED_KEEP_MS (10 * 60 * 1000)  /* flush ids remembered by Redis */
#define DIMS_REFRESH_MS (60 * 60 * 1000)  /* a device's type and labels rewritten */
#define HELD_MAX        200000            /* entries kept while Redis is away */

struct ru_field {
	char *name;
	struct ru_part p;
};

/* One device's partials of one bucket (a minute or an hour). */
struct ru_entry {
	char *device;
	char *dims;                /* "<type>\t<labels JSON>" */
	int64_t start;             /* the bucket's start, ms */
	size_t nf, cap;
	struct ru_field *f;
};

/* The entries of one bucket size: merged into the buckets of grans [lo, hi]. */
struct ru_table {
	enum ru_gran key, lo, hi;
	hub_strmap cur;            /* "<start>|<device>" -> struct ru_entry */
	struct ru_entry **list;    /* the same, in creation order */
	size_t nlist, caplist;
};

/* A call queued, sent and not answered yet, or kept for a resend. */
struct ru_call {
	struct hub_rollup *ru;
	int64_t first_ms;          /* first queued */
	size_t partials;
	hub_buf cmd;               /* RESP */
	struct ru_call *next;      /* in the queue or the retry list */
};

struct ru_list {
	struct ru_call *head, **tail;
	size_t n;
};

enum { T_FINE, T_COARSE, T__COUNT };

struct hub_rollup {
	struct hub *hub;
	int script_apply;
	struct ru_table t[T__COUNT];
	int64_t coarse_due;        /* ms: the coarse table's next flush */
	hub_strmap dims_sent;      /* device -> (void *)(when written, ms) */
	struct ru_list queue;      /* built, not sent yet */
	struct ru_list retry;      /* sent, no reply: sent again at the next flush */
	size_t inflight;           /* calls sent, not answered */
	uint64_t flush_seq;
	lws_sorted_usec_list_t sul;
	bool stopped;
};

static void entry_free(struct ru_entry *e)
{
	for (size_t i = 0; i < e->nf; i++)
		free(e->f[i].name);
	free(e->f);
	free(e->device);
	free(e->dims);
	free(e);
}

static struct ru_part *entry_field(struct ru_entry *e, const char *name, size_t len)
{
	for (size_t i = 0; i < e->nf; i++)
		if (!strncmp(e->f[i].name, name, len) && !e->f[i].name[len])
			return &e->f[i].p;
	if (e->nf == e->cap) {
		e->cap = e->cap ? 2 * e->cap : 4;
		e->f = hub_xrealloc(e->f, e->cap * sizeof(*e->f));
	}
	struct ru_field *f = &e->f[e->nf++];
	memset(f, 0, sizeof(*f));
	f->name = hub_xmalloc(len + 1);
	memcpy(f->name, name, len);
	f->name[len] = '\0';
	return &f->p;
}

/* ---- ingest ----------------------------------------------------------------- */

static struct ru_entry *table_entry(struct ru_table *t, const struct hub_ev_reading *r)
{
	char key[HUB_ID_MAX + 32];
	int64_t start = ru_bucket(r->ts, t->key);
	size_t kl = hub_fmt_i64(key, start), dl = strlen(r->device), tl, ll;
	struct ru_entry *e;

	key[kl++] = '|';
	memcpy(key + kl, r->device, dl);
	kl += dl;
	if ((e = hub_strmap_get(&t->cur, key, kl)))
		return e;
	tl = strlen(r->type);
	ll = r->labels_len ? r->labels_len : 2;
	e = hub_xcalloc(1, sizeof(*e));
	e->device = hub_xstrdup(r->device);
	e->start = start;
	e->dims = hub_xmalloc(tl + 1 + ll + 1);
	memcpy(e->dims, r->type, tl);
	e->dims[tl] = '\t';
	memcpy(e->dims + tl + 1, r->labels_len ? r->labels : "{}", ll);
	e->dims[tl + 1 + ll] = '\0';
	hub_strmap_put(&t->cur, key, kl, e);
	if (t->nlist == t->caplist) {
		t->caplist = t->caplist ? 2 * t->caplist : 64;
		t->list = hub_xrealloc(t->list, t->caplist * sizeof(*t->list));
	}
	t->list[t->nlist++] = e;
	return e;
}

static void on_stored(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	struct hub_rollup *ru = ctx;
	const struct hub_ev_readings *rs = payload;

	(void)hub;
	(void)ev;
	for (size_t i = 0; i < rs->n; i++) {
		const struct hub_ev_reading *r = &rs->v[i];

		if (!r->nfields || strlen(r->device) > HUB_ID_MAX)
			continue;
		for (int k = 0; k < T__COUNT; k++) {
			struct ru_entry *e = table_entry(&ru->t[k], r);

			for (size_t j = 0; j < r->nfields; j++)
				ru_part_add(entry_field(e, r->fields[j].name, r->fields[j].len),
					    r->fields[j].value, r->ts);
		}
	}
}

/* ---- calls: queue, send, retry -------------------------------------------- */

static void list_push(struct ru_list *l, struct ru_call *c)
{
	c->next = NULL;
	*l->tail = c;
	l->tail = &c->next;
	l->n++;
}

static struct ru_call *list_pop(struct ru_list *l)
{
	struct ru_call *c = l->head;

	if (!c)
		return NULL;
	if (!(l->head = c->next))
		l->tail = &l->head;
	l->n--;
	return c;
}

static void call_free(struct ru_call *c)
{
	hub_buf_free(&c->cmd);
	free(c);
}

static void list_free(struct ru_list *l)
{
	struct ru_call *c;

	while ((c = list_pop(l)))
		call_free(c);
}

static void given_up(struct hub_rollup *ru, struct ru_call *c, const char *why)
{
	ru->hub->metrics.analytics.rollup_lost++;
	hub_warn("rollup: a flush of %zu partials was given up (%s)", c->partials, why);
	call_free(c);
}

static void retry_push(struct hub_rollup *ru, struct ru_call *c)
{
	if (ru->stopped || hub_now_ms() - c->first_ms > RETRY_FOR_MS) {
		given_up(ru, c, "Redis away");
		return;
	}
	if (ru->retry.n == RETRY_MAX)
		given_up(ru, list_pop(&ru->retry), "too many unanswered");
	list_push(&ru->retry, c);
}

static void pump(struct hub_rollup *ru, size_t max_inflight);

static void on_applied(redisReply *reply, void *arg)
{
	struct ru_call *c = arg;
	struct hub_rollup *ru = c->ru;

	ru->inflight--;
	if (!reply) {
		retry_push(ru, c);
		return;
	}
	if (reply->type == REDIS_REPLY_ERROR) {
		hub_err("rollup: merge failed: %s", reply->str);
	} else {
		ru->hub->metrics.analytics.rollup_flushes++;
		if (reply->type == REDIS_REPLY_INTEGER && reply->integer == 1)
			ru->hub->metrics.analytics.rollup_partials += c->partials;
	}
	call_free(c);
	if (!ru->stopped)
		pump(ru, INFLIGHT_MAX);
}

/* Send queued calls while fewer than max_inflight are unanswered. */
static void pump(struct hub_rollup *ru, size_t max_inflight)
{
	while (ru->queue.head && ru->inflight < max_inflight && hub_redis_up(ru->hub->redis)) {
		struct ru_call *c = list_pop(&ru->queue);

		ru->inflight++;
		if (hub_redis_command_formatted(ru->hub->redis, on_applied, c, c->cmd.data,
						c->cmd.len)) {
			ru->inflight--;
			retry_push(ru, c);
		}
	}
}

/* ---- flush -------------------------------------------------------------------- */

/* Bucket keys of one call: key -> index (1-based) and their expiry. */
struct call_build {
	hub_strmap idx;
	hub_buf keys;              /* RESP of the bucket keys */
	hub_buf exp;               /* RESP of their PEXPIREAT times */
	hub_buf dims;              /* RESP of (device, dims) pairs */
	hub_buf ent;               /* RESP of the (index, field, partial) triples */
	hub_buf hf, part;          /* scratch: one hash field, one partial */
	size_t nkeys, ndims, nent;
};

static size_t bucket_index(struct hub_rollup *ru, struct call_build *b, unsigned shard,
			   enum ru_gran g, int64_t start)
{
	char key[HUB_KEY_MAX];
	size_t kl = hub_key_ru_bucket(key, sizeof(key), shard, ru_gran_names[g], start);
	void *v = hub_strmap_get(&b->idx, key, kl);
	long retention_s;

	if (v)
		return (size_t)(uintptr_t)v;
	retention_s = g == RU_1M ? ru->hub->cfg.rollup_retention_1m_s
		    : g == RU_1H ? ru->hub->cfg.rollup_retention_1h_s
				 : ru->hub->cfg.rollup_retention_1d_s;
	hub_resp_arg(&b->keys, key, kl);
	hub_resp_int(&b->exp, start + ru_gran_ms[g] + (int64_t)retention_s * 1000);
	b->nkeys++;
	hub_strmap_put(&b->idx, key, kl, (void *)(uintptr_t)b->nkeys);
	return b->nkeys;
}

static void build_reset(struct call_build *b)
{
	hub_strmap_free(&b->idx);
	memset(&b->idx, 0, sizeof(b->idx));
	b->keys.len = b->exp.len = b->dims.len = b->ent.len = 0;
	b->nkeys = b->ndims = b->nent = 0;
}

static void build_free(struct call_build *b)
{
	hub_strmap_free(&b->idx);
	hub_buf_free(&b->keys);
	hub_buf_free(&b->exp);
	hub_buf_free(&b->dims);
	hub_buf_free(&b->ent);
	hub_buf_free(&b->hf);
	hub_buf_free(&b->part);
}

/* The call built so far, onto the queue. */
static void build_queue(struct hub_rollup *ru, struct call_build *b, unsigned shard)
{
	struct hub *hub = ru->hub;
	struct ru_call *c;
	char key[HUB_KEY_MAX], id[HUB_ID_MAX + 64];
	int il;

	if (!b->nent) {
		build_reset(b);
		return;
	}
	c = hub_xcalloc(1, sizeof(*c));
	c->ru = ru;
	c->first_ms = hub_now_ms();
	c->partials = b->nent;
	il = snprintf(id, sizeof(id), "%s:%s:%llu", hub->instance_id, hub->run_token,
		      (unsigned long long)++ru->flush_seq);
	hub_resp_head(&c->cmd, 3 + 2 + b->nkeys + 4 + b->nkeys + 1 + 2 * b->ndims + 3 * b->nent);
	hub_resp_evalsha(&c->cmd, hub->redis, ru->script_apply, 2 + b->nkeys);
	hub_resp_arg(&c->cmd, key, hub_key_ru_applied(key, sizeof(key), shard));
	hub_resp_arg(&c->cmd, key, hub_key_ru_devs(key, sizeof(key), shard));
	hub_buf_append(&c->cmd, b->keys.data, b->keys.len);
	hub_resp_arg(&c->cmd, id, (size_t)il);
	hub_resp_int(&c->cmd, c->first_ms);
	hub_resp_int(&c->cmd, APPLIED_KEEP_MS);
	hub_resp_int(&c->cmd, (int64_t)b->nkeys);
	hub_buf_append(&c->cmd, b->exp.data, b->exp.len);
	hub_resp_int(&c->cmd, (int64_t)b->ndims);
	if (b->ndims) /* hub_buf_append: never a NULL source, even for 0 bytes */
		hub_buf_append(&c->cmd, b->dims.data, b->dims.len);
	hub_buf_append(&c->cmd, b->ent.data, b->ent.len);
	build_reset(b);
	list_push(&ru->queue, c);
}

/* Whether the device's type and labels go into this flush (first time, or
 * an hour since). */
static bool dims_due(struct hub_rollup *ru, const char *device, int64_t now)
{
	size_t dl = strlen(device);
	void *v = hub_strmap_get(&ru->dims_sent, device, dl);

	if (v && now - (int64_t)(uintptr_t)v < DIMS_REFRESH_MS)
		return false;
	hub_strmap_put(&ru->dims_sent, device, dl, (void *)(uintptr_t)now);
	return true;
}

static void table_drop(struct ru_table *t)
{
	for (size_t i = 0; i < t->nlist; i++)
		entry_free(t->list[i]);
	t->nlist = 0;
	hub_strmap_free(&t->cur);
	memset(&t->cur, 0, sizeof(t->cur));
	if (t->caplist > 4096) {
		free(t->list);
		t->list = NULL;
		t->caplist = 0;
	}
}

/* One entry's partials, one triple per (field, granularity of the table). */
static void build_entry(struct hub_rollup *ru, const struct ru_table *t, struct call_build *b,
			unsigned shard, const struct ru_entry *e)
{
	size_t dl = strlen(e->device);

	for (int g = (int)t->lo; g <= (int)t->hi; g++) {
		size_t bi = bucket_index(ru, b, shard, (enum ru_gran)g,
					 ru_bucket(e->start, (enum ru_gran)g));
		for (size_t j = 0; j < e->nf; j++) {
			b->hf.len = 0;
			hub_buf_append(&b->hf, e->device, dl);
			hub_buf_puts(&b->hf, "|");
			hub_buf_puts(&b->hf, e->f[j].name);
			b->part.len = 0;
			ru_part_format(&e->f[j].p, &b->part);
			hub_resp_int(&b->ent, (int64_t)bi);
			hub_resp_arg(&b->ent, b->hf.data, b->hf.len);
			hub_resp_arg(&b->ent, b->part.data, b->part.len);
			b->nent++;
		}
	}
}

/* A table's entries into queued calls, per shard; the table is emptied. */
static void table_flush(struct hub_rollup *ru, struct ru_table *t, unsigned shards, int64_t now)
{
	struct call_build b;

	memset(&b, 0, sizeof(b));
	for (unsigned k = 0; k < shards; k++) {
		for (size_t i = 0; i < t->nlist; i++) {
			struct ru_entry *e = t->list[i];

			if (hub_ingest_shard_of(e->device, shards) != k)
				continue;
			if (dims_due(ru, e->device, now)) {
				hub_resp_arg(&b.dims, e->device, strlen(e->device));
				hub_resp_str(&b.dims, e->dims);
				b.ndims++;
			}
			build_entry(ru, t, &b, k, e);
			if (b.nent >= CALL_PARTIALS)
				build_queue(ru, &b, k);
		}
		build_queue(ru, &b, k);
	}
	build_free(&b);
	table_drop(t);
}

/* Redis away: the tables are kept while they are small. */
static void hold(struct hub_rollup *ru)
{
	for (int k = 0; k < T__COUNT; k++) {
		struct ru_table *t = &ru->t[k];

		if (t->nlist < HELD_MAX)
			continue;
		ru->hub->metrics.analytics.rollup_lost++;
		hub_warn("rollup: %zu %s partials dropped (Redis away)", t->nlist,
			 ru_gran_names[t->key]);
		table_drop(t);
	}
}

/* all: every table now (a stop), else the fine one and the coarse one when due. */
static void flush(struct hub_rollup *ru, bool all)
{
	struct hub *hub = ru->hub;
	unsigned shards = hub_ingest_shards(hub);
	int64_t now = hub_now_ms();
	struct ru_call *c;

	if (!shards || !hub_redis_up(hub->redis)) {
		hold(ru);
		return;
	}
	/* Unanswered calls first, each once per flush. */
	while ((c = list_pop(&ru->retry))) {
		hub->metrics.analytics.rollup_retries++;
		list_push(&ru->queue, c);
	}
	/* The last flush is still being sent: the tables keep folding. */
	if (!all && ru->queue.head) {
		hold(ru);
		pump(ru, INFLIGHT_MAX);
		return;
	}
	table_flush(ru, &ru->t[T_FINE], shards, now);
	if (all || now >= ru->coarse_due) {
		table_flush(ru, &ru->t[T_COARSE], shards, now);
		ru->coarse_due = now + hub->cfg.rollup_coarse_flush_ms;
	}
	pump(ru, all ? SIZE_MAX : INFLIGHT_MAX);
}

static void tick(lws_sorted_usec_list_t *sul)
{
	struct hub_rollup *ru = lws_container_of(sul, struct hub_rollup, sul);

	flush(ru, false);
	lws_sul_schedule(ru->hub->ctx, 0, &ru->sul, tick,
			 (lws_usec_t)ru->hub->cfg.rollup_flush_ms * 1000);
}

/* ---- the module ------------------------------------------------------------- */

static int rollup_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_rollup *ru;

	(void)err;
	(void)errlen;
	if (!hub->cfg.rollups)
		return 0;
	ru = hub_xcalloc(1, sizeof(*ru));
	ru->hub = hub;
	ru->queue.tail = &ru->queue.head;
	ru->retry.tail = &ru->retry.head;
	ru->t[T_FINE] = (struct ru_table){ .key = RU_1M, .lo = RU_1M, .hi = RU_1M };
	ru->t[T_COARSE] = (struct ru_table){ .key = RU_1H, .lo = RU_1H, .hi = RU_1D };
	ru->coarse_due = hub_now_ms() + hub->cfg.rollup_coarse_flush_ms;
	ru->script_apply = hub_redis_add_script(hub->redis, hub_lua_rollup_apply);
	hub->rollup = ru;
	hub_observe(hub, HUB_EV_READINGS_STORED, on_stored, ru);
	lws_sul_schedule(hub->ctx, 0, &ru->sul, tick, (lws_usec_t)hub->cfg.rollup_flush_ms * 1000);
	return 0;
}

static void rollup_stop(struct hub *hub)
{
	struct hub_rollup *ru = hub->rollup;

	if (!ru)
		return;
	lws_sul_cancel(&ru->sul);
	flush(ru, true);        /* the last partials; replies may come as NULL */
	ru->stopped = true;
}

static void rollup_free(struct hub *hub)
{
	struct hub_rollup *ru = hub->rollup;

	if (!ru)
		return;
	for (int k = 0; k < T__COUNT; k++) {
		table_drop(&ru->t[k]);
		free(ru->t[k].list);
	}
	hub_strmap_free(&ru->dims_sent);
	list_free(&ru->queue);
	list_free(&ru->retry);
	free(ru);
	hub->rollup = NULL;
}

const struct hub_module hub_rollup_module = {
	.name = "rollup",
	.start = rollup_start,
	.stop = rollup_stop,
	.free = rollup_free,
};
