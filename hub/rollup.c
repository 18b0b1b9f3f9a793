/*
 * rollup.c - rollups at ingest (hub/rollup.h, docs/analytics.md).
 *
 * In memory, one struct ru_dev per device with readings in the last 10
 * minutes, holding a partial per numeric field (struct ru_part) for two
 * tables:
 *   fine    its current minute, merged into the 1m buckets every
 *           rollup-flush-ms;
 *   coarse  its current hour, merged into the 1h bucket and the 1d bucket
 *           that holds the hour every rollup-coarse-flush-ms.
 * Each reading is folded into both with one hash lookup (the device); a
 * reading of another minute or hour than the device's current one (a late
 * ts, a rollover before the flush) goes to a partial kept aside until the
 * flush. The devices' partials are zeroed by a flush, not freed. Holding
 * the hour's partials for a minute instead of merging them every second
 * divides the script's work (an HGET, a parse and an HSET per partial) by
 * about three.
 *
 * A flush groups a table's partials by rollup shard (hub_ingest_shard_of(
 * device, N)) into script calls of at most CALL_PARTIALS partials each
 * (the script spends about 10 us on a partial that merges into an
 * existing one, so a call holds Redis for under 1 ms, and a store call
 * queued behind two of them waits that long, not the 15-20 ms a call of
 * 1000 took in W3) and queues them; at most
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

#define CALL_PARTIALS   64                /* (device, field, bucket) partials per script call */
#define INFLIGHT_MAX    2                 /* script calls sent and not answered */
#define RETRY_MAX       64                /* unanswered calls kept for a resend */
#define RETRY_FOR_MS    (5 * 60 * 1000)   /* ... for at most this long */
#define APPLIED_KEEP_MS (10 * 60 * 1000)  /* flush ids remembered by Redis */
#define DIMS_REFRESH_MS (60 * 60 * 1000)  /* a device's type and labels rewritten */
#define HELD_MAX        200000            /* partials kept while Redis is away */
#define DEV_IDLE_MS     (10 * 60 * 1000)  /* a device without readings this long is forgotten */

enum { T_FINE, T_COARSE, T__COUNT };

struct ru_field {
	char *name;
	struct ru_part p;          /* count 0: nothing since the last flush */
};

/* The partials of one device in one bucket (a minute or an hour). */
struct ru_acc {
	int64_t start;             /* the bucket's start, ms */
	size_t nf, cap;
	struct ru_field *f;
	bool dirty;                /* holds readings not flushed yet */
};

/* A device with readings in the last DEV_IDLE_MS: its current minute and
 * hour, kept from flush to flush (no allocation per flush). */
struct ru_dev {
	char *device;
	char *dims;                /* "<type>\t<labels JSON>" */
	unsigned shard;            /* its rollup shard, once shard_known */
	bool shard_known;
	int64_t used_ms;           /* the flush tick of its last reading */
	int64_t dims_ms;           /* when its dims went to Redis (0: not yet) */
	struct ru_acc acc[T__COUNT];
};

/* A reading for another bucket than the device's current one (late ts, a
 * minute rolled over before the flush): kept aside until the next flush. */
struct ru_over {
	struct ru_dev *dev;
	struct ru_acc acc;
};

/* The partials of one bucket size, merged into the buckets of grans [lo, hi]. */
struct ru_table {
	enum ru_gran key, lo, hi;
	struct ru_dev **dirty;     /* devices whose acc of this table is dirty */
	size_t ndirty, capdirty;
	hub_strmap over;           /* "<start>|<device>" -> struct ru_over */
	struct ru_over **overs;    /* the same, in creation order */
	size_t nover, capover;
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

struct hub_rollup {
	struct hub *hub;
	int script_apply;
	struct ru_table t[T__COUNT];
	int64_t coarse_due;        /* ms: the coarse table's next flush */
	int64_t now_ms;            /* the last flush tick */
	hub_strmap devs;           /* device -> struct ru_dev */
	struct ru_dev **devlist;   /* the same */
	size_t ndevs, capdevs;
	struct ru_list queue;      /* built, not sent yet */
	struct ru_list retry;      /* sent, no reply: sent again at the next flush */
	size_t inflight;           /* calls sent, not answered */
	uint64_t flush_seq;
	lws_sorted_usec_list_t sul;
	bool stopped;
};

#define GROW(arr, n, cap)                                                  \
	do {                                                               \
		if ((n) == (cap)) {                                        \
			(cap) = (cap) ? 2 * (cap) : 64;                    \
			(arr) = hub_xrealloc((arr), (cap) * sizeof(*(arr))); \
		}                                                          \
	} while (0)

static void acc_free(struct ru_acc *a)
{
	for (size_t i = 0; i < a->nf; i++)
		free(a->f[i].name);
	free(a->f);
}

static void dev_free(struct ru_dev *d)
{
	for (int k = 0; k < T__COUNT; k++)
		acc_free(&d->acc[k]);
	free(d->device);
	free(d->dims);
	free(d);
}

static struct ru_part *acc_field(struct ru_acc *a, const char *name, size_t len)
{
	for (size_t i = 0; i < a->nf; i++)
		if (!strncmp(a->f[i].name, name, len) && !a->f[i].name[len])
			return &a->f[i].p;
	if (a->nf == a->cap) {
		a->cap = a->cap ? 2 * a->cap : 4;
		a->f = hub_xrealloc(a->f, a->cap * sizeof(*a->f));
	}
	struct ru_field *f = &a->f[a->nf++];
	memset(f, 0, sizeof(*f));
	f->name = hub_xmalloc(len + 1);
	memcpy(f->name, name, len);
	f->name[len] = '\0';
	return &f->p;
}

/* The partials flushed: names kept for the next bucket, counts zeroed. */
static void acc_reset(struct ru_acc *a)
{
	for (size_t i = 0; i < a->nf; i++)
		memset(&a->f[i].p, 0, sizeof(a->f[i].p));
	a->dirty = false;
}

/* ---- ingest ----------------------------------------------------------------- */

/* "<type>\t<labels JSON>" of r, into d->dims when it changed. */
static void dev_dims(struct ru_dev *d, const struct hub_ev_reading *r)
{
	size_t tl = strlen(r->type), ll = r->labels_len ? r->labels_len : 2;
	const char *labels = r->labels_len ? r->labels : "{}";

	if (d->dims && !strncmp(d->dims, r->type, tl) && d->dims[tl] == '\t' &&
	    !strncmp(d->dims + tl + 1, labels, ll) && !d->dims[tl + 1 + ll])
		return;
	free(d->dims);
	d->dims = hub_xmalloc(tl + 1 + ll + 1);
	memcpy(d->dims, r->type, tl);
	d->dims[tl] = '\t';
	memcpy(d->dims + tl + 1, labels, ll);
	d->dims[tl + 1 + ll] = '\0';
	d->dims_ms = 0;            /* changed: written with the next flush */
}

static struct ru_dev *dev_get(struct hub_rollup *ru, const struct hub_ev_reading *r, size_t dl)
{
	struct ru_dev *d = hub_strmap_get(&ru->devs, r->device, dl);

	if (d)
		return d;
	d = hub_xcalloc(1, sizeof(*d));
	d->device = hub_xstrdup(r->device);
	dev_dims(d, r);
	hub_strmap_put(&ru->devs, r->device, dl, d);
	GROW(ru->devlist, ru->ndevs, ru->capdevs);
	ru->devlist[ru->ndevs++] = d;
	return d;
}

/* The acc of table k that takes d's reading of bucket start: d's own, or,
 * when d's own holds another bucket, one kept aside until the flush. */
static struct ru_acc *table_acc(struct hub_rollup *ru, int k, struct ru_dev *d, int64_t start)
{
	struct ru_table *t = &ru->t[k];
	struct ru_acc *a = &d->acc[k];
	char key[HUB_ID_MAX + 32];
	struct ru_over *o;
	size_t kl, dl;

	if (!a->dirty) {
		a->start = start;
		a->dirty = true;
		GROW(t->dirty, t->ndirty, t->capdirty);
		t->dirty[t->ndirty++] = d;
		return a;
	}
	if (a->start == start)
		return a;
	kl = hub_fmt_i64(key, start);
	key[kl++] = '|';
	dl = strlen(d->device);
	memcpy(key + kl, d->device, dl);
	kl += dl;
	if (!(o = hub_strmap_get(&t->over, key, kl))) {
		o = hub_xcalloc(1, sizeof(*o));
		o->dev = d;
		o->acc.start = start;
		o->acc.dirty = true;
		hub_strmap_put(&t->over, key, kl, o);
		GROW(t->overs, t->nover, t->capover);
		t->overs[t->nover++] = o;
	}
	return &o->acc;
}

static void on_stored(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	struct hub_rollup *ru = ctx;
	const struct hub_ev_readings *rs = payload;

	(void)hub;
	(void)ev;
	for (size_t i = 0; i < rs->n; i++) {
		const struct hub_ev_reading *r = &rs->v[i];
		size_t dl = strlen(r->device);
		struct ru_dev *d;

		if (!r->nfields || dl > HUB_ID_MAX)
			continue;
		d = dev_get(ru, r, dl);
		if (d->used_ms != ru->now_ms) {   /* once per device and tick */
			d->used_ms = ru->now_ms;
			dev_dims(d, r);
		}
		for (int k = 0; k < T__COUNT; k++) {
			struct ru_acc *a = table_acc(ru, k, d, ru_bucket(r->ts, ru->t[k].key));

			for (size_t j = 0; j < r->nfields; j++)
				ru_part_add(acc_field(a, r->fields[j].name, r->fields[j].len),
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

/* Table k's partials gone (flushed or dropped): the devices' accs reset,
 * the ones kept aside freed. */
static void table_clear(struct hub_rollup *ru, int k)
{
	struct ru_table *t = &ru->t[k];

	for (size_t i = 0; i < t->ndirty; i++)
		acc_reset(&t->dirty[i]->acc[k]);
	t->ndirty = 0;
	for (size_t i = 0; i < t->nover; i++) {
		acc_free(&t->overs[i]->acc);
		free(t->overs[i]);
	}
	t->nover = 0;
	hub_strmap_free(&t->over);
	memset(&t->over, 0, sizeof(t->over));
}

/* One acc's partials, a triple per (field with readings, granularity of t). */
static void build_acc(struct hub_rollup *ru, const struct ru_table *t, struct call_build *b,
		      unsigned shard, const char *device, const struct ru_acc *a)
{
	size_t dl = strlen(device);

	for (int g = (int)t->lo; g <= (int)t->hi; g++) {
		size_t bi = bucket_index(ru, b, shard, (enum ru_gran)g,
					 ru_bucket(a->start, (enum ru_gran)g));
		for (size_t j = 0; j < a->nf; j++) {
			if (!a->f[j].p.count)
				continue;
			b->hf.len = 0;
			hub_buf_append(&b->hf, device, dl);
			hub_buf_puts(&b->hf, "|");
			hub_buf_puts(&b->hf, a->f[j].name);
			b->part.len = 0;
			ru_part_format(&a->f[j].p, &b->part);
			hub_resp_int(&b->ent, (int64_t)bi);
			hub_resp_arg(&b->ent, b->hf.data, b->hf.len);
			hub_resp_arg(&b->ent, b->part.data, b->part.len);
			b->nent++;
		}
	}
}

/* d's type and labels into the call, the first time, when they changed,
 * or an hour since. */
static void build_dims(struct call_build *b, struct ru_dev *d, int64_t now)
{
	if (d->dims_ms && now - d->dims_ms < DIMS_REFRESH_MS)
		return;
	d->dims_ms = now;
	hub_resp_arg(&b->dims, d->device, strlen(d->device));
	hub_resp_str(&b->dims, d->dims);
	b->ndims++;
}

/* d's rollup shard: hashed once (the shard count never changes once known). */
static unsigned dev_shard(struct ru_dev *d, unsigned shards)
{
	if (!d->shard_known) {
		d->shard = hub_ingest_shard_of(d->device, shards);
		d->shard_known = true;
	}
	return d->shard;
}

/* Table k's partials into queued calls, per shard; then cleared. */
static void table_flush(struct hub_rollup *ru, int k, unsigned shards, int64_t now)
{
	struct ru_table *t = &ru->t[k];
	struct call_build b;

	memset(&b, 0, sizeof(b));
	for (unsigned s = 0; s < shards; s++) {
		for (size_t i = 0; i < t->ndirty + t->nover; i++) {
			bool own = i < t->ndirty;
			struct ru_dev *d = own ? t->dirty[i] : t->overs[i - t->ndirty]->dev;
			const struct ru_acc *a = own ? &d->acc[k] : &t->overs[i - t->ndirty]->acc;

			if (dev_shard(d, shards) != s)
				continue;
			build_dims(&b, d, now);
			build_acc(ru, t, &b, s, d->device, a);
			if (b.nent >= CALL_PARTIALS)
				build_queue(ru, &b, s);
		}
		build_queue(ru, &b, s);
	}
	build_free(&b);
	table_clear(ru, k);
}

/* Devices without readings for DEV_IDLE_MS forgotten (none holds partials). */
static void devs_expire(struct hub_rollup *ru, int64_t now)
{
	for (size_t i = 0; i < ru->ndevs;) {
		struct ru_dev *d = ru->devlist[i];

		if (now - d->used_ms < DEV_IDLE_MS || d->acc[T_FINE].dirty || d->acc[T_COARSE].dirty) {
			i++;
			continue;
		}
		hub_strmap_del(&ru->devs, d->device, strlen(d->device));
		ru->devlist[i] = ru->devlist[--ru->ndevs];
		dev_free(d);
	}
}

/* Redis away: the partials are kept while they are not too many. */
static void hold(struct hub_rollup *ru)
{
	for (int k = 0; k < T__COUNT; k++) {
		struct ru_table *t = &ru->t[k];

		if (t->ndirty + t->nover < HELD_MAX)
			continue;
		ru->hub->metrics.analytics.rollup_lost++;
		hub_warn("rollup: the %s partials of %zu devices dropped (Redis away)",
			 ru_gran_names[t->key], t->ndirty + t->nover);
		table_clear(ru, k);
	}
}

/* all: every table now (a stop), else the fine one and the coarse one when due. */
static void flush(struct hub_rollup *ru, bool all)
{
	struct hub *hub = ru->hub;
	unsigned shards = hub_ingest_shards(hub);
	int64_t now = hub_now_ms();
	struct ru_call *c;

	ru->now_ms = now;
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
	table_flush(ru, T_FINE, shards, now);
	if (all || now >= ru->coarse_due) {
		table_flush(ru, T_COARSE, shards, now);
		ru->coarse_due = now + hub->cfg.rollup_coarse_flush_ms;
		devs_expire(ru, now);
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
	ru->now_ms = hub_now_ms();
	ru->coarse_due = ru->now_ms + hub->cfg.rollup_coarse_flush_ms;
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
		table_clear(ru, k);
		free(ru->t[k].dirty);
		free(ru->t[k].overs);
	}
	for (size_t i = 0; i < ru->ndevs; i++)
		dev_free(ru->devlist[i]);
	free(ru->devlist);
	hub_strmap_free(&ru->devs);
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
