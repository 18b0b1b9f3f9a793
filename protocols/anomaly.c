/*
 * anomaly.c - the anomaly module (protocols/anomaly.h, docs/anomalies.md).
 *
 * One record per device with a marked type, in a map by device id: its
 * fields' models (hub/anomaly.h), resolved against the type's rules of the
 * current schema set (re-matched by field name after a reload). A record is
 * created on the first reading (or announce) of the device on this
 * instance, and its models read from Redis then (HGETALL
 * iot:dev:{<device>}:anom); readings scored before that answer are scored
 * by models in warm-up (they flag nothing), and the stored model wins when
 * it has learnt more. Changed records are written back once every
 * anomaly-flush-ms (HSET of the changed record's fields, then EXPIRE
 * anomaly-state-ttl-s), and when the hub stops. Records of devices idle for
 * IDLE_MS are dropped from memory (their state is in Redis).
 */
#include "protocols/anomaly.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>

#include "hub/anomaly.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/strmap.h"

#define IDLE_MS      (10 * 60 * 1000)  /* a record unused this long leaves memory */
#define SWEEP_US     (60 * 1000 * 1000)

struct anom_field {
	char *name;
	const struct anom_rule *rule;  /* valid while dev->gen == hub->schemas_gen */
	struct anom_state st;
};

struct anom_dev {
	uint32_t gen;                  /* schemas_gen the rules were resolved at */
	const anom_spec *spec;
	struct anom_field *f;
	size_t nf;
	int64_t used_ms;
	bool dirty, loading;
	char id[];
};

struct anom {
	struct hub *hub;
	hub_strmap devs;               /* id -> struct anom_dev * */
	struct anom_dev **dirty;
	size_t ndirty, cap_dirty;
	lws_sorted_usec_list_t sul_flush, sul_sweep;
	bool stopping;
};

/* ---- records ---------------------------------------------------------------- */

static void dev_free(struct anom_dev *d)
{
	if (!d)
		return;
	for (size_t i = 0; i < d->nf; i++)
		free(d->f[i].name);
	free(d->f);
	free(d);
}

/* Matches d's fields to spec's rules by name; a field no longer marked is
 * dropped, a new one starts empty. */
static void dev_resolve(struct anom_dev *d, const anom_spec *spec, uint32_t gen)
{
	struct anom_field *nf = hub_xcalloc(spec->n ? spec->n : 1, sizeof(*nf));

	for (size_t i = 0; i < spec->n; i++) {
		const struct anom_rule *r = &spec->rules[i];
		nf[i].rule = r;
		for (size_t j = 0; j < d->nf; j++)
			if (d->f[j].name && !strcmp(d->f[j].name, r->field)) {
				nf[i].st = d->f[j].st;
				nf[i].name = d->f[j].name;
				d->f[j].name = NULL;
				break;
			}
		if (!nf[i].name)
			nf[i].name = hub_xstrdup(r->field);
	}
	for (size_t j = 0; j < d->nf; j++)
		free(d->f[j].name);
	free(d->f);
	d->f = nf;
	d->nf = spec->n;
	d->spec = spec;
	d->gen = gen;
}

static void mark_dirty(struct anom *a, struct anom_dev *d)
{
	if (d->dirty)
		return;
	d->dirty = true;
	if (a->ndirty == a->cap_dirty) {
		a->cap_dirty = a->cap_dirty ? 2 * a->cap_dirty : 64;
		a->dirty = hub_xrealloc(a->dirty, a->cap_dirty * sizeof(*a->dirty));
	}
	a->dirty[a->ndirty++] = d;
}

static void on_loaded(redisReply *reply, void *arg)
{
	struct anom_dev *d = arg;

	d->loading = false;
	if (!reply || reply->type != REDIS_REPLY_ARRAY)
		return; /* Redis lost or an error: the models start over */
	for (size_t i = 0; i + 1 < reply->elements; i += 2) {
		const redisReply *k = reply->element[i], *v = reply->element[i + 1];
		struct anom_state st;

		if (k->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
		    anom_state_decode(v->str, v->len, &st))
			continue;
		for (size_t j = 0; j < d->nf; j++)
			if (strlen(d->f[j].name) == k->len && !memcmp(d->f[j].name, k->str, k->len) &&
			    st.n > d->f[j].st.n) {
				d->f[j].st = st;
				break;
			}
	}
}

/* The record of device id (created, and its models asked of Redis, when
 * new), resolved against spec; NULL when spec is NULL. */
static struct anom_dev *dev_get(struct anom *a, const char *id, size_t len,
				const anom_spec *spec)
{
	struct hub *hub = a->hub;
	struct anom_dev *d = hub_strmap_get(&a->devs, id, len);
	char key[HUB_KEY_MAX];

	if (!spec)
		return NULL;
	if (!d) {
		d = hub_xcalloc(1, sizeof(*d) + len + 1);
		memcpy(d->id, id, len);
		hub_strmap_put(&a->devs, id, len, d);
		dev_resolve(d, spec, hub->schemas_gen);
		if (hub_key_dev_anom(key, sizeof(key), d->id)) {
			const char *argv[] = { "HGETALL", key };
			d->loading = !hub_redis_command_argv(hub->redis, on_loaded, d, 2, argv, NULL);
		}
	} else if (d->gen != hub->schemas_gen || d->spec != spec) {
		dev_resolve(d, spec, hub->schemas_gen);
	}
	d->used_ms = hub_now_ms();
	return d;
}

/* ---- the telemetry path ------------------------------------------------------- */

size_t anom_check(struct hub *hub, const char *id, size_t len, const schema_type *t,
		  int64_t ts, const json_t *data, hub_buf *out)
{
	const anom_spec *spec = schema_type_anomaly(t);
	struct anom *a = hub->anom;
	struct anom_dev *d;
	size_t nflags = 0;

	if (!spec || !a || !(d = dev_get(a, id, len, spec)))
		return 0;
	for (size_t i = 0; i < d->nf; i++) {
		const json_t *v = json_object_get(data, d->f[i].name);
		enum anom_kind k;
		double score = 0;

		if (!json_is_number(v))
			continue;
		k = anom_observe(d->f[i].rule, &d->f[i].st, json_number_value(v), ts, &score);
		if (k == ANOM_NONE)
			continue;
		hub->metrics.anomalies[k]++;
		hub_buf_puts(out, nflags ? "," : ",\"anomalies\":[");
		hub_buf_puts(out, "{\"field\":");
		hub_buf_json_str(out, d->f[i].name, strlen(d->f[i].name));
		hub_buf_printf(out, ",\"kind\":\"%s\",\"score\":%.4g}", anom_kind_names[k],
			       isfinite(score) ? score : 1e300);
		nflags++;
	}
	if (nflags)
		hub_buf_puts(out, "]");
	mark_dirty(a, d);
	return nflags;
}

void anom_prefetch(struct hub *hub, const char *id, const schema_type *t)
{
	if (hub->anom)
		dev_get(hub->anom, id, strlen(id), schema_type_anomaly(t));
}

/* ---- writing back ------------------------------------------------------------ */

static void dev_write(struct anom *a, struct anom_dev *d)
{
	struct hub *hub = a->hub;
	char key[HUB_KEY_MAX], ttl[24];
	const char **argv;
	char (*vals)[ANOM_STATE_MAX];
	size_t argc = 2;

	if (!d->nf || !hub_key_dev_anom(key, sizeof(key), d->id))
		return;
	argv = hub_xmalloc((2 + 2 * d->nf) * sizeof(*argv));
	vals = hub_xmalloc(d->nf * sizeof(*vals));
	argv[0] = "HSET";
	argv[1] = key;
	for (size_t i = 0; i < d->nf; i++) {
		anom_state_encode(&d->f[i].st, vals[i], sizeof(vals[i]));
		argv[argc++] = d->f[i].name;
		argv[argc++] = vals[i];
	}
	snprintf(ttl, sizeof(ttl), "%d", hub->cfg.anomaly_state_ttl_s);
	const char *exp[] = { "EXPIRE", key, ttl };
	/* Fire and forget: a write lost with Redis costs the models a few
	 * seconds of learning, nothing more. */
	if (!hub_redis_command_argv(hub->redis, NULL, NULL, (int)argc, argv, NULL))
		hub_redis_command_argv(hub->redis, NULL, NULL, 3, exp, NULL);
	free(argv);
	free(vals);
}

static void flush_dirty(struct anom *a)
{
	bool up = hub_redis_up(a->hub->redis);

	for (size_t i = 0; i < a->ndirty; i++) {
		a->dirty[i]->dirty = false;
		if (up)
			dev_write(a, a->dirty[i]);
	}
	a->ndirty = 0;
}

static void flush_cb(lws_sorted_usec_list_t *sul)
{
	struct anom *a = lws_container_of(sul, struct anom, sul_flush);

	flush_dirty(a);
	lws_sul_schedule(a->hub->ctx, 0, &a->sul_flush, flush_cb,
			 (lws_usec_t)a->hub->cfg.anomaly_flush_ms * 1000);
}

struct sweep {
	int64_t before;
	struct anom_dev **v;
	size_t n, cap;
};

static void sweep_one(const char *key, void *value, void *arg)
{
	struct anom_dev *d = value;
	struct sweep *s = arg;

	(void)key;
	if (d->dirty || d->loading || d->used_ms >= s->before)
		return;
	if (s->n == s->cap) {
		s->cap = s->cap ? 2 * s->cap : 64;
		s->v = hub_xrealloc(s->v, s->cap * sizeof(*s->v));
	}
	s->v[s->n++] = d;
}

static void sweep_cb(lws_sorted_usec_list_t *sul)
{
	struct anom *a = lws_container_of(sul, struct anom, sul_sweep);
	struct sweep s = { .before = hub_now_ms() - IDLE_MS };

	hub_strmap_foreach(&a->devs, sweep_one, &s);
	for (size_t i = 0; i < s.n; i++) {
		hub_strmap_del(&a->devs, s.v[i]->id, strlen(s.v[i]->id));
		dev_free(s.v[i]);
	}
	free(s.v);
	lws_sul_schedule(a->hub->ctx, 0, &a->sul_sweep, sweep_cb, SWEEP_US);
}

/* ---- the module ---------------------------------------------------------------- */

static int anom_start(struct hub *hub, char *err, size_t errlen)
{
	struct anom *a = hub_xcalloc(1, sizeof(*a));

	(void)err;
	(void)errlen;
	a->hub = hub;
	hub->anom = a;
	lws_sul_schedule(hub->ctx, 0, &a->sul_flush, flush_cb,
			 (lws_usec_t)hub->cfg.anomaly_flush_ms * 1000);
	lws_sul_schedule(hub->ctx, 0, &a->sul_sweep, sweep_cb, SWEEP_US);
	return 0;
}

static void anom_stop(struct hub *hub)
{
	struct anom *a = hub->anom;

	if (!a)
		return;
	lws_sul_cancel(&a->sul_flush);
	lws_sul_cancel(&a->sul_sweep);
	flush_dirty(a); /* the last writes, queued while Redis is still up */
}

static void free_dev_cb(const char *key, void *value, void *arg)
{
	(void)key;
	(void)arg;
	dev_free(value);
}

static void anom_free(struct hub *hub)
{
	struct anom *a = hub->anom;

	if (!a)
		return;
	hub_strmap_foreach(&a->devs, free_dev_cb, NULL);
	hub_strmap_free(&a->devs);
	free(a->dirty);
	free(a);
	hub->anom = NULL;
}

const struct hub_module anom_module = {
	.name = "anomaly",
	.start = anom_start,
	.stop = anom_stop,
	.free = anom_free,
};
