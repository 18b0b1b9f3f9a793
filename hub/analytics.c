/*
 * analytics.c - GET /v1/aggregates (hub/analytics.h, docs/analytics.md).
 *
 * A request goes: validation (422 naming the field) -> the key's tier:
 * range (422) and rate (hub/lua/tier_take.lua, 429 + Retry-After) -> the
 * cache (hub/lua/aq_get.lua: the answer, or the single-flight lock, or
 * "wait": polled every POLL_MS) -> on a miss, the computation -> the
 * answer, streamed in json, ndjson or csv as the socket drains.
 *
 * The computation reads every rollup shard's device table (type and
 * labels, HGETALL iot:ru:{i<k>}:devs), keeps the devices the selector and
 * the key's patterns allow, then reads their cells with
 * hub/lua/rollup_read.lua (per shard, per 1,000 devices) and merges them
 * per (bucket, group). The result is kept as text, one line per row
 * "<bucket>\t<group as JSON>\t<partial>", which is also what the cache
 * holds: every format renders from it.
 */
#include "hub/analytics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>
#include <openssl/evp.h>

#include "hub/auth.h"
#include "hub/http.h"
#include "hub/hub.h"
#include "hub/ingest.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/rollup_core.h"
#include "hub/strmap.h"
#include "hub_lua.h"

#define POLL_MS          20
#define MAX_LABELS       16
#define READ_DEVICES     1000     /* hash fields per rollup_read call */
#define ROWS_PER_CHUNK   256
#define FIELD_MAX        255
#define ANSWER_MAX       (64 * 1024 * 1024) /* cached text; larger is not cached */

enum aq_fmt { AQ_JSON, AQ_NDJSON, AQ_CSV };
enum aq_cache { AQ_MISS, AQ_HIT, AQ_SHARED };
#define AQ_MAX_COMPUTING 4  /* computations at once per instance */

static const char *const cache_names[] = { "miss", "hit", "shared" };

struct analytics {
	struct hub *hub;
	int script_read, script_get, script_put, script_tier;
	struct ru_tiers tiers;
	struct aq_ctx *waiting;    /* requests polling the cache */
	unsigned computing;        /* computations in flight (AQ_MAX_COMPUTING) */
	uint64_t token_seq;
};

struct aq_dev {
	char *device;
	char *group;               /* JSON: "\"value\"" or "null" */
	unsigned shard;
};

struct aq_ctx {
	struct hub_req *rq;
	struct analytics *an;
	/* the query */
	char field[FIELD_MAX + 1];
	enum ru_gran g;
	int64_t from, to;
	enum aq_fmt fmt;
	char *device, *type, *group_by;
	size_t nlabels;
	char *lk[MAX_LABELS], *lv[MAX_LABELS];
	const struct ru_tier *tier;
	int tier_idx;
	/* cache */
	char hash[41];
	char token[HUB_ID_MAX + 64];
	bool locked;
	enum aq_cache cache;
	int64_t wait_deadline;
	lws_sorted_usec_list_t sul;
	bool polling;
	struct aq_ctx *next_wait, **prev_wait;
	/* computation */
	unsigned shards, waiting;
	bool failed, too_many, computing;
	struct aq_dev *devs;
	size_t ndevs, capdevs;
	int64_t b0;                /* first bucket */
	size_t nb;                 /* buckets */
	hub_strmap cells;          /* "<bucket idx>|<group>" -> struct ru_part */
	/* answer */
	hub_buf text;              /* the rows as text */
	size_t pos;                /* rendered up to */
	size_t rows;
	hub_buf out;
	int64_t t0_us;
};

/* ---- helpers -------------------------------------------------------------- */

static void cell_free(const char *key, void *v, void *arg)
{
	(void)key;
	(void)arg;
	free(v);
}

static void wait_unlink(struct aq_ctx *c)
{
	if (!c->prev_wait)
		return;
	*c->prev_wait = c->next_wait;
	if (c->next_wait)
		c->next_wait->prev_wait = c->prev_wait;
	c->prev_wait = NULL;
	c->next_wait = NULL;
}

static void ctx_free(void *p)
{
	struct aq_ctx *c = p;

	wait_unlink(c);
	if (c->computing)
		c->an->computing--;
	free(c->device);
	free(c->type);
	free(c->group_by);
	for (size_t i = 0; i < c->nlabels; i++) {
		free(c->lk[i]);
		free(c->lv[i]);
	}
	for (size_t i = 0; i < c->ndevs; i++) {
		free(c->devs[i].device);
		free(c->devs[i].group);
	}
	free(c->devs);
	hub_strmap_foreach(&c->cells, cell_free, NULL);
	hub_strmap_free(&c->cells);
	hub_buf_free(&c->text);
	hub_buf_free(&c->out);
	free(c);
}

/* ---- rendering ------------------------------------------------------------- */

static void put_num(hub_buf *b, double v)
{
	char num[40];
	size_t n = hub_fmt_decimal(num, v);

	if (!isfinite(v)) {
		hub_buf_puts(b, "null");
		return;
	}
	if (!n) {
		for (int prec = 15; prec <= 17; prec++) {
			n = (size_t)snprintf(num, sizeof(num), "%.*g", prec, v);
			if (prec == 17 || strtod(num, NULL) == v)
				break;
		}
	}
	hub_buf_append(b, num, n);
}

/* The CSV field of a group: a JSON string decoded (the few escapes labels
 * hold) and quoted for CSV; anything else is left empty. */
static void put_csv_group(hub_buf *o, const char *group, size_t gl)
{
	json_t *s;
	const char *v;

	if (!gl || group[0] != '"')
		return;
	s = json_loadb(group, gl, JSON_DECODE_ANY, NULL);
	v = json_string_value(s);
	hub_buf_puts(o, "\"");
	for (const char *q = v ? v : ""; *q; q++) {
		if (*q == '"')
			hub_buf_puts(o, "\"\"");
		else
			hub_buf_append(o, q, 1);
	}
	hub_buf_puts(o, "\"");
	json_decref(s);
}

/* What goes before a field after the first: "," in CSV, else json_key
 * (",\"name\":"). */
static void put_key(struct aq_ctx *c, const char *json_key)
{
	hub_buf_puts(&c->out, c->fmt == AQ_CSV ? "," : json_key);
}

/* Writes one row (bucket, group JSON, partial) in the request's format: the
 * same fields in the same order, named in JSON; CSV has no sum_squares. */
static void render_row(struct aq_ctx *c, int64_t bucket, const char *group, size_t gl,
		       const struct ru_part *p)
{
	hub_buf *o = &c->out;
	bool csv = c->fmt == AQ_CSV;

	if (csv) {
		hub_buf_i64(o, bucket);
		hub_buf_puts(o, ",");
		put_csv_group(o, group, gl);
	} else {
		if (c->fmt == AQ_JSON && c->rows)
			hub_buf_puts(o, ",");
		hub_buf_puts(o, "{\"bucket\":");
		hub_buf_i64(o, bucket);
		if (c->group_by) {
			hub_buf_puts(o, ",\"group\":");
			hub_buf_append(o, group, gl);
		}
	}
	put_key(c, ",\"count\":");
	hub_buf_i64(o, p->count);
	put_key(c, ",\"sum\":");
	put_num(o, p->sum);
	if (!csv) {
		hub_buf_puts(o, ",\"sum_squares\":");
		put_num(o, p->sumsq);
	}
	put_key(c, ",\"min\":");
	put_num(o, p->min);
	put_key(c, ",\"max\":");
	put_num(o, p->max);
	put_key(c, ",\"mean\":");
	put_num(o, ru_part_mean(p));
	put_key(c, ",\"stddev\":");
	put_num(o, ru_part_stddev(p));
	put_key(c, ",\"first\":");
	put_num(o, p->first);
	put_key(c, ",\"first_ts\":");
	hub_buf_i64(o, p->first_ts);
	put_key(c, ",\"last\":");
	put_num(o, p->last);
	put_key(c, ",\"last_ts\":");
	hub_buf_i64(o, p->last_ts);
	hub_buf_puts(o, csv ? "\r\n" : c->fmt == AQ_NDJSON ? "}\n" : "}");
}

static void drained(struct hub_req *rq)
{
	struct aq_ctx *c = hub_req_ctx(rq);
	size_t n = 0;

	c->out.len = 0;
	while (c->pos < c->text.len && n < ROWS_PER_CHUNK) {
		const char *line = c->text.data + c->pos;
		const char *nl = memchr(line, '\n', c->text.len - c->pos);
		const char *t1, *t2;
		struct ru_part p;
		int64_t bucket;

		if (!nl)
			nl = c->text.data + c->text.len;
		c->pos = (size_t)(nl - c->text.data) + 1;
		t1 = memchr(line, '\t', (size_t)(nl - line));
		t2 = t1 ? memchr(t1 + 1, '\t', (size_t)(nl - t1 - 1)) : NULL;
		if (!t2 || hub_parse_i64(line, (size_t)(t1 - line), INT64_MIN / 2, INT64_MAX / 2,
					  &bucket) ||
		    ru_part_parse(t2 + 1, (size_t)(nl - t2 - 1), &p))
			continue;
		render_row(c, bucket, t1 + 1, (size_t)(t2 - t1 - 1), &p);
		c->rows++;
		n++;
	}
	if (c->pos >= c->text.len) {
		if (c->fmt == AQ_JSON)
			hub_buf_puts(&c->out, "]}");
		if (c->out.len)
			hub_req_stream_write(rq, c->out.data, c->out.len);
		hub_req_stream_end(rq);
		return;
	}
	hub_req_stream_write(rq, c->out.data, c->out.len);
}

static void answer(struct aq_ctx *c)
{
	struct hub_req *rq = c->rq;
	struct hub *hub = hub_req_hub(rq);
	static const char *const ctypes[] = { "application/json", "application/x-ndjson",
					      "text/csv" };

	hub->metrics.analytics.queries++;
	if (c->cache == AQ_HIT)
		hub->metrics.analytics.cache_hits++;
	else if (c->cache == AQ_SHARED)
		hub->metrics.analytics.cache_shared++;
	hub_hist_observe(&hub->metrics.analytics.query_latency,
			 (double)(hub_mono_us() - c->t0_us) / 1e6);
	hub_req_add_header(rq, "x-rollup:", ru_gran_names[c->g]);
	hub_req_add_header(rq, "x-cache:", cache_names[c->cache]);
	hub_req_stream_begin(rq, 200, ctypes[c->fmt], drained);
	c->out.len = 0;
	if (c->fmt == AQ_JSON) {
		hub_buf_puts(&c->out, "{\"field\":");
		hub_buf_json_str(&c->out, c->field, strlen(c->field));
		hub_buf_printf(&c->out, ",\"granularity\":\"%s\",\"rollup\":\"%s\",\"from\":%lld,"
			       "\"to\":%lld,\"group_by\":", ru_gran_names[c->g],
			       ru_gran_names[c->g], (long long)c->from, (long long)c->to);
		if (c->group_by)
			hub_buf_json_str(&c->out, c->group_by, strlen(c->group_by));
		else
			hub_buf_puts(&c->out, "null");
		hub_buf_printf(&c->out, ",\"cache\":\"%s\",\"rows\":[", cache_names[c->cache]);
	} else if (c->fmt == AQ_CSV) {
		hub_buf_puts(&c->out, "bucket,group,count,sum,min,max,mean,stddev,first,first_ts,"
				      "last,last_ts\r\n");
	}
	hub_req_stream_write(rq, c->out.data, c->out.len);
}

/* ---- computing -------------------------------------------------------------- */

static int cmp_line(const void *a, const void *b)
{
	const char *const *x = a, *const *y = b;

	return strcmp(*x, *y);
}

/* Sorted rows into c->text: "<bucket>\t<group>\t<partial>\n". */
struct text_build {
	struct aq_ctx *c;
	char **lines;
	size_t n;
};

static void cell_line(const char *key, void *v, void *arg)
{
	struct text_build *tb = arg;
	struct aq_ctx *c = tb->c;
	const char *bar = strchr(key, '|');
	long long bi = strtoll(key, NULL, 10);
	hub_buf line = { 0 };

	/* zero-padded bucket index first: the sort is by time, then group */
	hub_buf_printf(&line, "%08lld\t", bi);
	hub_buf_i64(&line, c->b0 + bi * ru_gran_ms[c->g]);
	hub_buf_puts(&line, "\t");
	hub_buf_puts(&line, bar + 1);
	hub_buf_puts(&line, "\t");
	ru_part_format(v, &line);
	hub_buf_puts(&line, "\n");
	hub_buf_append(&line, "", 1);
	tb->lines[tb->n++] = line.data;
}

static void build_text(struct aq_ctx *c)
{
	struct text_build tb = { c, hub_xcalloc(c->cells.count + 1, sizeof(char *)), 0 };

	hub_strmap_foreach(&c->cells, cell_line, &tb);
	qsort(tb.lines, tb.n, sizeof(*tb.lines), cmp_line);
	c->text.len = 0;
	for (size_t i = 0; i < tb.n; i++) {
		hub_buf_puts(&c->text, tb.lines[i] + 9); /* the sort prefix goes */
		free(tb.lines[i]);
	}
	free(tb.lines);
}

/* A computation goes on when its client left if it holds the single-flight
 * lock: the others wait for its answer. */
static bool abandoned(const struct aq_ctx *c)
{
	return c->failed || (hub_req_gone(c->rq) && !c->locked);
}

static void on_put(redisReply *r, void *arg)
{
	(void)r;
	(void)arg;
}

static void computed(struct aq_ctx *c)
{
	struct hub_req *rq = c->rq;
	struct hub *hub = hub_req_hub(rq);

	build_text(c);
	hub->metrics.analytics.computations++;
	if (c->locked && c->text.len < ANSWER_MAX) {
		char k1[HUB_KEY_MAX], k2[HUB_KEY_MAX], ttl[24];
		/* an empty answer is stored too: "" is a valid cached answer */
		hub_key_aq(k1, sizeof(k1), c->hash);
		hub_key_aq_lock(k2, sizeof(k2), c->hash);
		snprintf(ttl, sizeof(ttl), "%d", hub->cfg.aggregates_cache_ttl_ms);
		const char *argv[] = { "EVALSHA", hub_redis_script_sha(hub->redis, c->an->script_put),
				       "2", k1, k2, c->text.data ? c->text.data : "", ttl, c->token };
		size_t lens[] = { 7, 40, 1, strlen(k1), strlen(k2), c->text.len, strlen(ttl),
				  strlen(c->token) };
		hub_redis_command_argv(hub->redis, on_put, NULL, 8, argv, lens);
	}
	if (!hub_req_gone(rq))
		answer(c);
}

struct read_op {
	struct hub_req *rq;
	size_t base;               /* global index of the call's first device */
};

static void on_read(redisReply *r, void *arg)
{
	struct read_op *op = arg;
	struct hub_req *rq = op->rq;
	struct aq_ctx *c = hub_req_ctx(rq);
	size_t base = op->base;

	c->waiting--;
	if (abandoned(c))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("aggregates: rollup_read failed: %s", r->str);
		c->failed = true;
		hub_req_redis_failed(rq, r);
		goto out;
	}
	/* The call's devices are c->devs[base..]: ARGV index j is base + j - 1. */
	for (size_t i = 0; i + 2 < r->elements; i += 3) {
		const redisReply *ki = r->element[i], *fj = r->element[i + 1], *v = r->element[i + 2];
		struct ru_part p, *cell;
		char key[64 + 2 * FIELD_MAX];
		size_t dev;

		if (ki->type != REDIS_REPLY_INTEGER || fj->type != REDIS_REPLY_INTEGER ||
		    v->type != REDIS_REPLY_STRING || ru_part_parse(v->str, v->len, &p))
			continue;
		dev = base + (size_t)fj->integer - 1;
		if (dev >= c->ndevs || ki->integer < 1 || (size_t)ki->integer > c->nb)
			continue;
		int kl = snprintf(key, sizeof(key), "%lld|%s", (long long)ki->integer - 1,
				  c->devs[dev].group);
		if (kl <= 0 || (size_t)kl >= sizeof(key))
			continue;
		if (!(cell = hub_strmap_get(&c->cells, key, (size_t)kl))) {
			cell = hub_xcalloc(1, sizeof(*cell));
			hub_strmap_put(&c->cells, key, (size_t)kl, cell);
		}
		ru_part_merge(cell, &p);
	}
	if (!c->waiting)
		computed(c);
out:
	free(op);
	hub_req_unref(rq);
}

/* Reads the cells of every selected device: one call per shard and per
 * READ_DEVICES devices (the devices are sorted by shard). */
static void read_cells(struct aq_ctx *c)
{
	struct hub_req *rq = c->rq;
	struct hub *hub = hub_req_hub(rq);
	size_t nb = c->nb;
	char (*keys)[HUB_KEY_MAX] = hub_xmalloc(nb * sizeof(*keys));
	hub_buf *hf = hub_xcalloc(READ_DEVICES, sizeof(*hf));
	hub_buf cmdb = { 0 };
	char nk[16];

	snprintf(nk, sizeof(nk), "%zu", nb);
	for (size_t at = 0; at < c->ndevs;) {
		unsigned k = c->devs[at].shard;
		size_t n = 0;

		while (at + n < c->ndevs && n < READ_DEVICES && c->devs[at + n].shard == k)
			n++;
		cmdb.len = 0;
		hub_resp_head(&cmdb, 3 + nb + n);
		hub_resp_evalsha(&cmdb, hub->redis, c->an->script_read, nb);
		for (size_t i = 0; i < nb; i++) {
			size_t kl = hub_key_ru_bucket(keys[i], sizeof(keys[i]), k, ru_gran_names[c->g],
						      c->b0 + (int64_t)i * ru_gran_ms[c->g]);
			hub_resp_arg(&cmdb, keys[i], kl);
		}
		for (size_t j = 0; j < n; j++) {
			hf[j].len = 0;
			hub_buf_puts(&hf[j], c->devs[at + j].device);
			hub_buf_puts(&hf[j], "|");
			hub_buf_puts(&hf[j], c->field);
			hub_resp_arg(&cmdb, hf[j].data, hf[j].len);
		}
		struct read_op *op = hub_xmalloc(sizeof(*op));
		op->rq = rq;
		op->base = at;
		hub_req_ref(rq);
		c->waiting++;
		if (hub_redis_command_formatted(hub->redis, on_read, op, cmdb.data, cmdb.len)) {
			c->waiting--;
			free(op);
			hub_req_unref(rq);
			c->failed = true;
			break;
		}
		at += n;
	}
	for (size_t j = 0; j < READ_DEVICES; j++)
		hub_buf_free(&hf[j]);
	free(hf);
	hub_buf_free(&cmdb);
	free(keys);
	if (c->failed)
		hub_req_unavailable(rq); /* the calls sent see the request answered */
}

static int cmp_dev(const void *a, const void *b)
{
	const struct aq_dev *x = a, *y = b;

	if (x->shard != y->shard)
		return x->shard < y->shard ? -1 : 1;
	return strcmp(x->device, y->device);
}

/* Whether a device's dimensions ("<type>\t<labels JSON>") pass the
 * selector; its group (JSON) into *group. */
static bool select_dev(struct aq_ctx *c, const char *device, const char *dims, size_t len,
		       char **group)
{
	const char *tab = memchr(dims, '\t', len);
	json_t *labels;
	bool ok = true;

	if (!tab || (c->device && strcmp(c->device, device)) ||
	    !auth_patterns_match(&hub_req_who(c->rq)->devices, device))
		return false;
	if (c->type && ((size_t)(tab - dims) != strlen(c->type) ||
			memcmp(dims, c->type, (size_t)(tab - dims))))
		return false;
	labels = json_loadb(tab + 1, len - (size_t)(tab - dims) - 1, 0, NULL);
	for (size_t i = 0; ok && i < c->nlabels; i++) {
		const char *v = json_string_value(json_object_get(labels, c->lk[i]));
		ok = v && !strcmp(v, c->lv[i]);
	}
	if (ok) {
		json_t *gv = c->group_by ? json_object_get(labels, c->group_by) : NULL;
		hub_buf g = { 0 };
		if (json_is_string(gv))
			hub_buf_json_str(&g, json_string_value(gv), json_string_length(gv));
		else
			hub_buf_puts(&g, "null");
		hub_buf_append(&g, "", 1);
		*group = g.data;
	}
	json_decref(labels);
	return ok;
}

static void on_devs(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct aq_ctx *c = hub_req_ctx(rq);

	c->waiting--;
	if (abandoned(c))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		c->failed = true;
		hub_req_redis_failed(rq, r);
		goto out;
	}
	for (size_t i = 0; i + 1 < r->elements && !c->too_many; i += 2) {
		const redisReply *d = r->element[i], *v = r->element[i + 1];
		char *group = NULL;

		if (d->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
		    !hub_id_valid(d->str, d->len) || !select_dev(c, d->str, v->str, v->len, &group))
			continue;
		if (c->ndevs == (size_t)hub_req_hub(rq)->cfg.aggregates_max_devices) {
			c->too_many = true;
			free(group);
			break;
		}
		if (c->ndevs == c->capdevs) {
			c->capdevs = c->capdevs ? 2 * c->capdevs : 64;
			c->devs = hub_xrealloc(c->devs, c->capdevs * sizeof(*c->devs));
		}
		c->devs[c->ndevs++] = (struct aq_dev){ hub_xstrdup(d->str), group,
			hub_ingest_shard_of(d->str, c->shards) };
	}
	if (c->waiting)
		goto out;
	if (c->too_many) {
		char msg[128];
		snprintf(msg, sizeof(msg), "the selector matches more than %d devices "
			 "(aggregates-max-devices): narrow it",
			 hub_req_hub(rq)->cfg.aggregates_max_devices);
		c->failed = true;
		hub_req_error(rq, 422, "invalid", c->device ? "device" : c->type ? "device_type"
				  : c->nlabels ? "label" : "device", msg);
		goto out;
	}
	if (!c->ndevs) {
		computed(c);
		goto out;
	}
	qsort(c->devs, c->ndevs, sizeof(*c->devs), cmp_dev);
	read_cells(c);
out:
	hub_req_unref(rq);
}

static void compute(struct aq_ctx *c)
{
	struct hub_req *rq = c->rq;
	struct hub *hub = hub_req_hub(rq);

	c->shards = hub_ingest_shards(hub);
	if (!c->shards) {
		hub_req_unavailable(rq);
		return;
	}
	/* A computation reads many rollup keys on the connection ingest uses:
	 * a few at a time, so that distinct heavy queries cannot stall it
	 * (identical ones share one computation already). */
	if (c->an->computing >= AQ_MAX_COMPUTING) {
		hub->metrics.analytics.busy++;
		hub_req_add_header(rq, "retry-after:", "1");
		hub_req_error(rq, 503, "busy", NULL,
			      "too many aggregate queries computing on this instance; retry later");
		return;
	}
	c->an->computing++;
	c->computing = true;
	for (unsigned k = 0; k < c->shards; k++) {
		char key[HUB_KEY_MAX];
		hub_key_ru_devs(key, sizeof(key), k);
		const char *argv[] = { "HGETALL", key };
		hub_req_ref(rq);
		if (hub_redis_command_argv(hub->redis, on_devs, rq, 2, argv, NULL)) {
			hub_req_unref(rq);
			c->failed = true;
			hub_req_unavailable(rq);
			return;
		}
		c->waiting++;
	}
}

/* ---- cache and single-flight ---------------------------------------------- */

static void cache_ask(struct aq_ctx *c);

static void poll_fire(lws_sorted_usec_list_t *sul)
{
	struct aq_ctx *c = lws_container_of(sul, struct aq_ctx, sul);
	struct hub_req *rq = c->rq;

	c->polling = false;
	wait_unlink(c);
	if (!hub_req_gone(rq)) {
		if (hub_now_ms() > c->wait_deadline) {
			/* the computing instance is slow or gone: compute here,
			 * without the lock (the answer is not stored) */
			c->cache = AQ_MISS;
			compute(c);
		} else {
			cache_ask(c);
		}
	}
	hub_req_unref(rq);
}

static void poll_later(struct aq_ctx *c)
{
	struct analytics *an = c->an;

	hub_req_ref(c->rq);
	c->polling = true;
	c->next_wait = an->waiting;
	if (an->waiting)
		an->waiting->prev_wait = &c->next_wait;
	an->waiting = c;
	c->prev_wait = &an->waiting;
	lws_sul_schedule(hub_req_hub(c->rq)->ctx, 0, &c->sul, poll_fire, POLL_MS * 1000);
}

static void on_cache(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct aq_ctx *c = hub_req_ctx(rq);

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
	    r->element[0]->type != REDIS_REPLY_INTEGER) {
		hub_req_redis_failed(rq, r);
		goto out;
	}
	switch (r->element[0]->integer) {
	case 1:
		if (r->elements != 2 || r->element[1]->type != REDIS_REPLY_STRING) {
			hub_req_redis_failed(rq, r);
			break;
		}
		hub_buf_append(&c->text, r->element[1]->str, r->element[1]->len);
		if (c->cache != AQ_SHARED)
			c->cache = AQ_HIT;
		answer(c);
		break;
	case 2:
		c->locked = true;
		c->cache = AQ_MISS;
		compute(c);
		break;
	default:
		if (c->cache == AQ_MISS) {
			c->cache = AQ_SHARED; /* another request computes it */
			c->wait_deadline = hub_now_ms() + hub_req_hub(rq)->cfg.aggregates_lock_ms;
		}
		poll_later(c);
		break;
	}
out:
	hub_req_unref(rq);
}

static void cache_ask(struct aq_ctx *c)
{
	struct hub_req *rq = c->rq;
	struct hub *hub = hub_req_hub(rq);
	char k1[HUB_KEY_MAX], k2[HUB_KEY_MAX], ms[24];

	hub_key_aq(k1, sizeof(k1), c->hash);
	hub_key_aq_lock(k2, sizeof(k2), c->hash);
	snprintf(ms, sizeof(ms), "%d", hub->cfg.aggregates_lock_ms);
	const char *argv[] = { "EVALSHA", hub_redis_script_sha(hub->redis, c->an->script_get), "2",
			       k1, k2, c->token, ms };
	hub_req_ref(rq);
	if (hub_redis_command_argv(hub->redis, on_cache, rq, 7, argv, NULL)) {
		hub_req_unref(rq);
		hub_req_unavailable(rq);
	}
}

/* The query in one normal form (selectors sorted), hashed: equal queries of
 * one key share an answer. The key's name is part of it: what a key may
 * see depends on its device patterns. */
static void query_hash(struct aq_ctx *c)
{
	hub_buf b = { 0 };
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int mdlen = 0;
	size_t order[MAX_LABELS];

	for (size_t i = 0; i < c->nlabels; i++)
		order[i] = i;
	for (size_t i = 1; i < c->nlabels; i++)
		for (size_t j = i; j > 0 && strcmp(c->lk[order[j - 1]], c->lk[order[j]]) > 0; j--) {
			size_t t = order[j];
			order[j] = order[j - 1];
			order[j - 1] = t;
		}
	hub_buf_printf(&b, "v1\n%s\n%s\n%s\n%lld\n%lld\n%s\n%s\n%s\n", hub_req_who(c->rq)->name,
		       c->field, ru_gran_names[c->g], (long long)c->from, (long long)c->to,
		       c->device ? c->device : "\x01", c->type ? c->type : "\x01",
		       c->group_by ? c->group_by : "\x01");
	for (size_t i = 0; i < c->nlabels; i++)
		hub_buf_printf(&b, "%s\n%s\n", c->lk[order[i]], c->lv[order[i]]);
	EVP_Digest(b.data, b.len, md, &mdlen, EVP_sha1(), NULL);
	for (unsigned i = 0; i < mdlen && i < 20; i++)
		snprintf(c->hash + 2 * i, 3, "%02x", md[i]);
	hub_buf_free(&b);
}

static void start_query(struct aq_ctx *c)
{
	struct hub *hub = hub_req_hub(c->rq);

	if (!hub->cfg.aggregates_cache_ttl_ms) {
		c->cache = AQ_MISS;
		compute(c);
		return;
	}
	query_hash(c);
	snprintf(c->token, sizeof(c->token), "%s:%s:%llu", hub->instance_id, hub->run_token,
		 (unsigned long long)++c->an->token_seq);
	c->cache = AQ_MISS;
	cache_ask(c);
}

/* ---- tiers ---------------------------------------------------------------- */

static void on_tier(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct aq_ctx *c = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
	    r->element[0]->type != REDIS_REPLY_INTEGER ||
	    r->element[1]->type != REDIS_REPLY_INTEGER) {
		hub_req_redis_failed(rq, r);
		goto out;
	}
	if (!r->element[0]->integer) {
		char ra[24], msg[160];
		long long ms = r->element[1]->integer;
		snprintf(ra, sizeof(ra), "%lld", ms > 0 ? (ms + 999) / 1000 : 1);
		snprintf(msg, sizeof(msg), "the %s tier allows %lld requests per %lld s; retry "
			 "after %s s", c->tier->name, (long long)c->tier->requests,
			 (long long)(c->tier->window_ms / 1000), ra);
		hub->metrics.analytics.tier_refused_rate[c->tier_idx]++;
		hub_req_add_header(rq, "retry-after:", ra);
		hub_req_error(rq, 429, "rate_limited", NULL, msg);
		goto out;
	}
	start_query(c);
out:
	hub_req_unref(rq);
}

/* ---- the route ------------------------------------------------------------ */

static int invalid(struct hub_req *rq, const char *field, const char *msg)
{
	hub_req_error(rq, 422, "invalid", field, msg);
	return -1;
}

static int parse_query(struct aq_ctx *c, const struct hub_query *q)
{
	struct hub_req *rq = c->rq;
	const char *v;
	long long from, to;
	int g;

	if ((v = hub_query_get(q, "format"))) {
		if (!strcmp(v, "json"))
			c->fmt = AQ_JSON;
		else if (!strcmp(v, "ndjson"))
			c->fmt = AQ_NDJSON;
		else if (!strcmp(v, "csv"))
			c->fmt = AQ_CSV;
		else
			return invalid(rq, "format", "format must be json, ndjson or csv");
	}
	if (!(v = hub_query_get(q, "field")) || !*v)
		return invalid(rq, "field", "field (a numeric field of the readings) is required");
	if (strlen(v) > FIELD_MAX)
		return invalid(rq, "field", "field must be at most 255 bytes");
	snprintf(c->field, sizeof(c->field), "%s", v);
	if (!(v = hub_query_get(q, "granularity")))
		return invalid(rq, "granularity", "granularity (1m, 1h or 1d) is required");
	if ((g = ru_gran_parse(v)) < 0)
		return invalid(rq, "granularity", "granularity must be 1m, 1h or 1d");
	c->g = (enum ru_gran)g;
	if (!(v = hub_query_get(q, "from")))
		return invalid(rq, "from", "from (ms since the epoch) is required");
	if (hub_parse_ll(v, 0, INT64_MAX / 4, &from))
		return invalid(rq, "from", "from must be an integer (ms since the epoch)");
	if (!(v = hub_query_get(q, "to")))
		return invalid(rq, "to", "to (ms since the epoch) is required");
	if (hub_parse_ll(v, 0, INT64_MAX / 4, &to))
		return invalid(rq, "to", "to must be an integer (ms since the epoch)");
	if (to < from)
		return invalid(rq, "to", "to must not be before from");
	c->from = from;
	c->to = to;
	if (to - from > ru_gran_max_range_ms[c->g]) {
		char msg[128];
		snprintf(msg, sizeof(msg), "to - from must be at most %lld ms with granularity %s",
			 (long long)ru_gran_max_range_ms[c->g], ru_gran_names[c->g]);
		return invalid(rq, "to", msg);
	}
	if ((v = hub_query_get(q, "device"))) {
		if (!hub_id_valid(v, strlen(v)))
			return invalid(rq, "device", "device must match [A-Za-z0-9._:-]{1,128}");
		c->device = hub_xstrdup(v);
	}
	if ((v = hub_query_get(q, "device_type"))) {
		if (!hub_id_valid(v, strlen(v)))
			return invalid(rq, "device_type", "device_type must match [A-Za-z0-9._:-]{1,128}");
		c->type = hub_xstrdup(v);
	}
	if ((v = hub_query_get(q, "group_by"))) {
		if (!*v || strlen(v) > 128)
			return invalid(rq, "group_by", "group_by must be a label name of 1 to 128 bytes");
		c->group_by = hub_xstrdup(v);
	}
	for (size_t i = 0; i < q->n; i++) {
		if (strncmp(q->name[i], "label.", 6))
			continue;
		const char *k = q->name[i] + 6;
		if (!*k || strlen(k) > 128)
			return invalid(rq, q->name[i], "a label filter is label.<name>=<value> with a "
				       "name of 1 to 128 bytes");
		if (c->nlabels == MAX_LABELS)
			return invalid(rq, q->name[i], "at most 16 label filters");
		c->lk[c->nlabels] = hub_xstrdup(k);
		c->lv[c->nlabels++] = hub_xstrdup(q->value[i]);
	}
	c->b0 = ru_bucket(c->from, c->g);
	c->nb = (size_t)((ru_bucket(c->to, c->g) - c->b0) / ru_gran_ms[c->g]) + 1;
	return 0;
}

static void on_aggregates(struct hub_req *rq, const struct hub_route_args *a)
{
	struct analytics *an = a->ctx;
	struct hub *hub = an->hub;
	struct aq_ctx *c = hub_xcalloc(1, sizeof(*c));
	const char *tname = hub_req_who(rq)->tier;

	c->rq = rq;
	c->an = an;
	c->t0_us = hub_mono_us();
	hub_req_set_ctx(rq, c, ctx_free);
	if (parse_query(c, a->query))
		return;
	if (!*tname || !(c->tier = ru_tiers_find(&an->tiers, tname)))
		c->tier = ru_tiers_find(&an->tiers, hub->cfg.api_default_tier);
	c->tier_idx = (int)(c->tier - an->tiers.v);
	hub->metrics.analytics.tier_requests[c->tier_idx]++;
	if (c->to - c->from > c->tier->max_range_ms) {
		char msg[160];
		snprintf(msg, sizeof(msg), "to - from must be at most %lld ms in the %s tier of "
			 "this API key", (long long)c->tier->max_range_ms, c->tier->name);
		hub->metrics.analytics.tier_refused_range[c->tier_idx]++;
		invalid(rq, "to", msg);
		return;
	}
	if (!c->tier->requests) {
		start_query(c);
		return;
	}
	char key[HUB_KEY_MAX], lim[24], win[24];
	if (!hub_key_tier(key, sizeof(key), hub_req_who(rq)->name)) {
		hub_req_error(rq, 500, "internal", NULL, "API key name unusable in a key");
		return;
	}
	snprintf(lim, sizeof(lim), "%lld", (long long)c->tier->requests);
	snprintf(win, sizeof(win), "%lld", (long long)c->tier->window_ms);
	const char *argv[] = { "EVALSHA", hub_redis_script_sha(hub->redis, an->script_tier), "1",
			       key, lim, win };
	hub_req_ref(rq);
	if (hub_redis_command_argv(hub->redis, on_tier, rq, 6, argv, NULL)) {
		hub_req_unref(rq);
		hub_req_unavailable(rq);
	}
}

static const struct hub_route routes[] = {
	{ "GET", "/v1/aggregates", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ, on_aggregates },
};

/* ---- the module ----------------------------------------------------------- */

static int analytics_start(struct hub *hub, char *err, size_t errlen)
{
	struct analytics *an = hub_xcalloc(1, sizeof(*an));

	an->hub = hub;
	hub->analytics = an;
	if (ru_tiers_parse(hub->cfg.api_tiers, &an->tiers, err, errlen))
		return -1;
	for (size_t i = 0; i < an->tiers.n && i < HUB_TIERS_MAX; i++)
		hub->metrics.analytics.tier_names[i] = an->tiers.v[i].name;
	hub->metrics.analytics.ntiers = (int)(an->tiers.n < HUB_TIERS_MAX ? an->tiers.n
									: HUB_TIERS_MAX);
	an->script_read = hub_redis_add_script(hub->redis, hub_lua_rollup_read);
	an->script_get = hub_redis_add_script(hub->redis, hub_lua_aq_get);
	an->script_put = hub_redis_add_script(hub->redis, hub_lua_aq_put);
	an->script_tier = hub_redis_add_script(hub->redis, hub_lua_tier_take);
	hub_http_add_routes(hub, routes, sizeof(routes) / sizeof(routes[0]), an);
	return 0;
}

static void analytics_stop(struct hub *hub)
{
	struct analytics *an = hub->analytics;

	if (!an)
		return;
	while (an->waiting) {
		struct aq_ctx *c = an->waiting;
		struct hub_req *rq = c->rq;
		lws_sul_cancel(&c->sul);
		wait_unlink(c);
		c->polling = false;
		hub_req_unref(rq);
	}
}

static void analytics_free(struct hub *hub)
{
	hub->metrics.analytics.ntiers = 0;
	free(hub->analytics);
	hub->analytics = NULL;
}

const struct hub_module hub_analytics_module = {
	.name = "analytics",
	.start = analytics_start,
	.stop = analytics_stop,
	.free = analytics_free,
};
