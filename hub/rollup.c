/*
 * rollup.c - rollups at ingest (hub/rollup.h, docs/analytics.md).
 *
 * In memory: one entry per (minute, device) holding a partial per numeric
 * field (struct ru_part). A flush takes every entry, groups them by rollup
 * shard (hub_ingest_shard_of(device, N)), and sends per shard one script
 * call that merges each field's partial into the 1m bucket of its minute
 * and the 1h and 1d buckets that hold that minute. A call that got no
 * reply (Redis lost, timeout) is kept and sent again with the same flush
 * id on the next flush, RETRY_MAX calls and RETRY_FOR_MS at most; the
 * script merges an id once.
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

#define CALL_ENTRIES    1000              /* (device, minute) entries per script call */
#define RETRY_MAX       64                /* unanswered calls kept for a resend */
#define RETRY_FOR_MS    (5 * 60 * 1000)   /* ... for at most this long */
#define APPLIED_KEEP_MS (10 * 60 * 1000)  /* flush ids remembered by Redis */
#define DIMS_REFRESH_MS (60 * 60 * 1000)  /* a device's type and labels rewritten */
#define HELD_MAX        200000            /* entries kept while Redis is away */

struct ru_field {
	char *name;
	struct ru_part p;
};

/* One device's partials of one minute. */
struct ru_entry {
	char *device;
	char *dims;                /* "<type>\t<labels JSON>" */
	int64_t minute;
	size_t nf, cap;
	struct ru_field *f;
};

/* A call sent and not answered yet, or kept for a resend. */
struct ru_call {
	struct hub_rollup *ru;
	int64_t first_ms;          /* first sent */
	size_t partials;
	hub_buf cmd;               /* RESP */
	struct ru_call *next;      /* in the retry list */
};

struct hub_rollup {
	struct hub *hub;
	int script_apply;
	hub_strmap cur;            /* "<minute>|<device>" -> struct ru_entry */
	struct ru_entry **list;    /* the same, in creation order */
	size_t nlist, caplist;
	hub_strmap dims_sent;      /* device -> (void *)(when written, ms) */
	struct ru_call *retry, **retry_tail;
	size_t nretry;
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

static void on_stored(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	struct hub_rollup *ru = ctx;
	const struct hub_ev_readings *rs = payload;
	char key[HUB_ID_MAX + 32];

	(void)hub;
	(void)ev;
	for (size_t i = 0; i < rs->n; i++) {
		const struct hub_ev_reading *r = &rs->v[i];
		int64_t minute = ru_bucket(r->ts, RU_1M);
		struct ru_entry *e;
		size_t kl;

		if (!r->nfields)
			continue;
		kl = hub_fmt_i64(key, minute);
		key[kl++] = '|';
		size_t dl = strlen(r->device);
		if (dl > HUB_ID_MAX)
			continue;
		memcpy(key + kl, r->device, dl);
		kl += dl;
		if (!(e = hub_strmap_get(&ru->cur, key, kl))) {
			size_t tl = strlen(r->type);
			e = hub_xcalloc(1, sizeof(*e));
			e->device = hub_xstrdup(r->device);
			e->minute = minute;
			e->dims = hub_xmalloc(tl + 1 + r->labels_len + 3);
			memcpy(e->dims, r->type, tl);
			e->dims[tl] = '\t';
			if (r->labels_len)
				memcpy(e->dims + tl + 1, r->labels, r->labels_len);
			else
				memcpy(e->dims + tl + 1, "{}", 2);
			e->dims[tl + 1 + (r->labels_len ? r->labels_len : 2)] = '\0';
			hub_strmap_put(&ru->cur, key, kl, e);
			if (ru->nlist == ru->caplist) {
				ru->caplist = ru->caplist ? 2 * ru->caplist : 64;
				ru->list = hub_xrealloc(ru->list, ru->caplist * sizeof(*ru->list));
			}
			ru->list[ru->nlist++] = e;
		}
		for (size_t j = 0; j < r->nfields; j++)
			ru_part_add(entry_field(e, r->fields[j].name, r->fields[j].len),
				    r->fields[j].value, r->ts);
	}
}

/* ---- flush -------------------------------------------------------------------- */

static void call_free(struct ru_call *c)
{
	hub_buf_free(&c->cmd);
	free(c);
}

static void call_send(struct ru_call *c);

static void retry_push(struct hub_rollup *ru, struct ru_call *c)
{
	struct hub *hub = ru->hub;

	if (ru->stopped || hub_now_ms() - c->first_ms > RETRY_FOR_MS) {
		hub->metrics.analytics.rollup_lost++;
		hub_warn("rollup: a flush of %zu partials was given up (Redis away)", c->partials);
		call_free(c);
		return;
	}
	if (ru->nretry == RETRY_MAX) {
		struct ru_call *old = ru->retry;
		ru->retry = old->next;
		if (!ru->retry)
			ru->retry_tail = &ru->retry;
		ru->nretry--;
		hub->metrics.analytics.rollup_lost++;
		hub_warn("rollup: a flush of %zu partials was given up (too many unanswered)",
			 old->partials);
		call_free(old);
	}
	c->next = NULL;
	*ru->retry_tail = c;
	ru->retry_tail = &c->next;
	ru->nretry++;
}

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
}

static void call_send(struct ru_call *c)
{
	struct hub_rollup *ru = c->ru;

	ru->inflight++;
	if (hub_redis_command_formatted(ru->hub->redis, on_applied, c, c->cmd.data, c->cmd.len)) {
		ru->inflight--;
		retry_push(ru, c);
	}
}

/* Bucket keys of one call: key -> index (1-based) and their expiry. */
struct call_build {
	hub_strmap idx;
	hub_buf keys;              /* RESP of the bucket keys */
	hub_buf exp;               /* RESP of their PEXPIREAT times */
	hub_buf dims;              /* RESP of (device, dims) pairs */
	hub_buf ent;               /* RESP of the (index, field, partial) triples */
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
}

static void build_send(struct hub_rollup *ru, struct call_build *b, unsigned shard)
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
	call_send(c);
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

static void drop_all(struct hub_rollup *ru)
{
	for (size_t i = 0; i < ru->nlist; i++)
		entry_free(ru->list[i]);
	ru->nlist = 0;
	hub_strmap_free(&ru->cur);
	memset(&ru->cur, 0, sizeof(ru->cur));
	if (ru->caplist > 4096) {
		free(ru->list);
		ru->list = NULL;
		ru->caplist = 0;
	}
}

static void flush(struct hub_rollup *ru)
{
	struct hub *hub = ru->hub;
	unsigned shards = hub_ingest_shards(hub);
	struct call_build b;
	hub_buf part = { 0 }, hf = { 0 };
	int64_t now = hub_now_ms();
	size_t nretry = ru->nretry;

	/* Unanswered calls first, each once per flush. */
	for (size_t i = 0; i < nretry && hub_redis_up(hub->redis); i++) {
		struct ru_call *c = ru->retry;
		ru->retry = c->next;
		if (!ru->retry)
			ru->retry_tail = &ru->retry;
		ru->nretry--;
		hub->metrics.analytics.rollup_retries++;
		call_send(c);
	}
	if (ru->nlist && (!shards || !hub_redis_up(hub->redis))) {
		if (ru->nlist < HELD_MAX)
			return; /* kept in memory until Redis is back */
		hub->metrics.analytics.rollup_lost++;
		hub_warn("rollup: %zu partials dropped (Redis away)", ru->nlist);
		drop_all(ru);
		return;
	}
	if (!ru->nlist)
		return;
	memset(&b, 0, sizeof(b));
	for (unsigned k = 0; k < shards; k++) {
		size_t entries = 0;

		for (size_t i = 0; i < ru->nlist; i++) {
			struct ru_entry *e = ru->list[i];
			size_t dl = strlen(e->device);

			if (hub_ingest_shard_of(e->device, shards) != k)
				continue;
			if (dims_due(ru, e->device, now)) {
				hub_resp_arg(&b.dims, e->device, dl);
				hub_resp_str(&b.dims, e->dims);
				b.ndims++;
			}
			for (int g = 0; g < RU__COUNT; g++) {
				size_t bi = bucket_index(ru, &b, k, (enum ru_gran)g,
							 ru_bucket(e->minute, (enum ru_gran)g));
				for (size_t j = 0; j < e->nf; j++) {
					hf.len = 0;
					hub_buf_append(&hf, e->device, dl);
					hub_buf_puts(&hf, "|");
					hub_buf_puts(&hf, e->f[j].name);
					part.len = 0;
					ru_part_format(&e->f[j].p, &part);
					hub_resp_int(&b.ent, (int64_t)bi);
					hub_resp_arg(&b.ent, hf.data, hf.len);
					hub_resp_arg(&b.ent, part.data, part.len);
					b.nent++;
				}
			}
			if (++entries == CALL_ENTRIES) {
				build_send(ru, &b, k);
				entries = 0;
			}
		}
		build_send(ru, &b, k);
	}
	build_free(&b);
	hub_buf_free(&part);
	hub_buf_free(&hf);
	drop_all(ru);
}

static void tick(lws_sorted_usec_list_t *sul)
{
	struct hub_rollup *ru = lws_container_of(sul, struct hub_rollup, sul);

	flush(ru);
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
	ru->retry_tail = &ru->retry;
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
	flush(ru);              /* the last partials; replies may come as NULL */
	ru->stopped = true;
}

static void rollup_free(struct hub *hub)
{
	struct hub_rollup *ru = hub->rollup;

	if (!ru)
		return;
	for (size_t i = 0; i < ru->nlist; i++)
		entry_free(ru->list[i]);
	free(ru->list);
	hub_strmap_free(&ru->cur);
	hub_strmap_free(&ru->dims_sent);
	while (ru->retry) {
		struct ru_call *c = ru->retry;
		ru->retry = c->next;
		call_free(c);
	}
	free(ru);
	hub->rollup = NULL;
}

const struct hub_module hub_rollup_module = {
	.name = "rollup",
	.start = rollup_start,
	.stop = rollup_stop,
	.free = rollup_free,
};
