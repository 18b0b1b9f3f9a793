/*
 * cmd_stats.c - command transitions per minute (see cmd_stats.h).
 */
#include "commands/cmd_stats.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include <libwebsockets.h>

#include "commands/commands.h"
#include "hub/hub.h"
#include "hub/http.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/redis.h"
#include "hub/strmap.h"
#include "hub/util.h"
#include "hub_lua.h"

#define CST_MINUTE_MS 60000
#define CST_MINUTES 60            /* the longest window */
#define CST_RING (CST_MINUTES + 2)
#define CST_FIELDS_MAX 256        /* distinct fields kept per minute */
#define CST_TTL_S 3900            /* a minute's key outlives the window */
#define CST_FLUSH_US (2 * LWS_US_PER_SEC)

struct cst_minute {
	int64_t start;               /* ms; 0: unused */
	hub_strmap counts;           /* field -> count (as a pointer-sized int) */
	bool dirty;                  /* changed since its last write */
};

struct cmd_stats {
	struct hub *hub;
	int script_put, script_read;
	struct hub_redis_channel *ch;
	struct cst_minute m[CST_RING];
	lws_sorted_usec_list_t sul;
};

/* ---- counting ------------------------------------------------------------ */

static void count(struct cst_minute *m, const char *field, size_t len)
{
	uintptr_t v = (uintptr_t)hub_strmap_get(&m->counts, field, len);

	if (!v && m->counts.count >= CST_FIELDS_MAX)
		return;
	hub_strmap_put(&m->counts, field, len, (void *)(v + 1));
	m->dirty = true;
}

static void minute_reset(struct cst_minute *m, int64_t start)
{
	hub_strmap_free(&m->counts);
	memset(&m->counts, 0, sizeof(m->counts));
	m->start = start;
	m->dirty = false;
}

static const char *find(const char *h, size_t n, const char *needle, size_t k)
{
	for (size_t i = 0; i + k <= n; i++)
		if (h[i] == needle[0] && !memcmp(h + i, needle, k))
			return h + i;
	return NULL;
}

/* One event line "<device> TAB <type> TAB <labels> TAB <body>" (body: the
 * inside of a JSON object with "status":"<s>" and "at":<ms>;
 * hub/lua/_command.lua). Strings in it are JSON-encoded, so the quoted
 * names below cannot occur inside a value. */
static void on_line(struct cmd_stats *s, const char *p, size_t n)
{
	const char *t1 = memchr(p, '\t', n), *t2, *body, *st, *q, *at;
	char state[24], field[HUB_ID_MAX + 32];
	int64_t ms, now = hub_now_ms();

	if (!t1 || !(t2 = memchr(t1 + 1, '\t', n - (size_t)(t1 + 1 - p))))
		return;
	size_t tlen = (size_t)(t2 - t1 - 1);
	const char *t3 = memchr(t2 + 1, '\t', n - (size_t)(t2 + 1 - p));
	if (!t3 || !tlen || tlen > HUB_ID_MAX)
		return;
	body = t3 + 1;
	size_t blen = n - (size_t)(body - p);
	st = find(body, blen, "\"status\":\"", 10);
	at = find(body, blen, ",\"at\":", 6);
	if (!st || !at)
		return;
	st += 10;
	q = memchr(st, '"', blen - (size_t)(st - body));
	if (!q || (size_t)(q - st) >= sizeof(state))
		return;
	memcpy(state, st, (size_t)(q - st));
	state[q - st] = '\0';
	at += 6;
	size_t alen = 0;
	while (at + alen < body + blen && at[alen] >= '0' && at[alen] <= '9')
		alen++;
	if (!cmd_state_valid(state) || hub_parse_i64(at, alen, 0, INT64_MAX, &ms) ||
	    ms < now - (int64_t)CST_MINUTES * CST_MINUTE_MS || ms > now + CST_MINUTE_MS)
		return;
	int64_t start = ms - ms % CST_MINUTE_MS;
	struct cst_minute *m = &s->m[(start / CST_MINUTE_MS) % CST_RING];
	if (m->start != start) {
		if (m->start > start)
			return;          /* the slot holds a newer minute */
		minute_reset(m, start);
	}
	count(m, state, strlen(state));
	int k = snprintf(field, sizeof(field), "%.*s|%s", (int)tlen, t1 + 1, state);
	count(m, field, (size_t)k);
}

static void on_event(const char *channel, const char *payload, size_t len, void *arg)
{
	struct cmd_stats *s = arg;
	const char *p = payload, *end = payload + len;

	(void)channel;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
		if (n)
			on_line(s, p, n);
		p += n + 1;
	}
}

/* ---- writing ------------------------------------------------------------- */

struct put_args {
	const char **argv;
	char (*num)[24];
	int argc;
};

static void put_field(const char *key, void *value, void *arg)
{
	struct put_args *a = arg;

	snprintf(a->num[a->argc], sizeof(a->num[0]), "%" PRIuPTR, (uintptr_t)value);
	a->argv[a->argc++] = key;
	a->argv[a->argc] = a->num[a->argc - 1];
	a->argc++;
}

static void on_put(redisReply *r, void *arg)
{
	struct cst_minute *m = arg;

	if (!r)
		m->dirty = true;         /* written again at the next flush */
	else if (r->type == REDIS_REPLY_ERROR)
		hub_warn("command stats: %s", r->str);
}

static void flush(struct cmd_stats *s)
{
	int64_t now = hub_now_ms();

	for (size_t i = 0; i < CST_RING; i++) {
		struct cst_minute *m = &s->m[i];
		char key[64], ttl[16];

		if (!m->dirty || !m->start)
			continue;
		if (m->start < now - (int64_t)(CST_MINUTES + 1) * CST_MINUTE_MS) {
			minute_reset(m, 0);
			continue;
		}
		size_t cap = 5 + 2 * m->counts.count;
		struct put_args a = {
			hub_xmalloc(cap * sizeof(*a.argv)),
			hub_xmalloc((cap ? cap : 1) * sizeof(*a.num)), 5,
		};
		hub_key_cstats(key, sizeof(key), m->start);
		snprintf(ttl, sizeof(ttl), "%d", CST_TTL_S);
		a.argv[0] = "EVALSHA";
		a.argv[1] = hub_redis_script_sha(s->hub->redis, s->script_put);
		a.argv[2] = "1";
		a.argv[3] = key;
		a.argv[4] = ttl;
		hub_strmap_foreach(&m->counts, put_field, &a);
		if (!hub_redis_command_argv(s->hub->redis, on_put, m, a.argc, a.argv, NULL))
			m->dirty = false;        /* else: again at the next flush */
		free(a.argv);
		free(a.num);
	}
}

static void flush_cb(lws_sorted_usec_list_t *sul)
{
	struct cmd_stats *s = lws_container_of(sul, struct cmd_stats, sul);

	flush(s);
	lws_sul_schedule(s->hub->ctx, 0, &s->sul, flush_cb, CST_FLUSH_US);
}

struct cmd_stats *cmd_stats_new(struct hub *hub)
{
	struct cmd_stats *s = hub_xcalloc(1, sizeof(*s));

	s->hub = hub;
	s->script_put = hub_redis_add_script(hub->redis, hub_lua_cmd_stats_put);
	s->script_read = hub_redis_add_script(hub->redis, hub_lua_cmd_stats_read);
	/* a pattern of its own: the stream module holds the channel itself */
	s->ch = hub_redis_channel_get(hub->redis, HUB_CH_COMMANDS, true, on_event, NULL, s);
	lws_sul_schedule(hub->ctx, 0, &s->sul, flush_cb, CST_FLUSH_US);
	return s;
}

void cmd_stats_stop(struct cmd_stats *s)
{
	if (!s)
		return;
	lws_sul_cancel(&s->sul);
	flush(s);                        /* the last counts, queued */
}

void cmd_stats_free(struct cmd_stats *s)
{
	if (!s)
		return;
	for (size_t i = 0; i < CST_RING; i++)
		hub_strmap_free(&s->m[i].counts);
	free(s);
}

/* ---- GET /v1/commands/stats ---------------------------------------------- */

struct read_ctx {
	int minutes;
	int64_t first, to;           /* the first minute's start; now */
	char window[8];
};

static bool final_state(const char *s)
{
	return cmd_state_final(s);
}

/* Adds count v of field f (an HGETALL pair) to the totals. */
static void add(json_t *states, json_t *by_type, const char *f, long long v)
{
	const char *bar = strchr(f, '|');
	json_t *obj = states;
	const char *st = f;

	if (bar) {
		char type[HUB_ID_MAX + 1];
		size_t tl = (size_t)(bar - f);
		if (!tl || tl > HUB_ID_MAX)
			return;
		memcpy(type, f, tl);
		type[tl] = '\0';
		if (!(obj = json_object_get(by_type, type))) {
			obj = json_object();
			json_object_set_new(by_type, type, obj);
		}
		st = bar + 1;
	}
	if (!cmd_state_valid(st))
		return;
	json_int_t cur = json_integer_value(json_object_get(obj, st));
	json_object_set_new(obj, st, json_integer(cur + v));
}

static void on_read(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct read_ctx *c = hub_req_ctx(rq);

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != (size_t)c->minutes) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_warn("command stats: %s", r->str);
		hub_req_error(rq, 503, "unavailable", NULL, "Redis is unavailable; retry later");
		goto out;
	}
	json_t *o = json_object(), *states = json_object(), *by_type = json_object();
	json_t *per_minute = json_array();
	long long fin = 0, nonfin = 0;
	for (size_t i = 0; i < r->elements; i++) {
		const redisReply *h = r->element[i];
		long long mf = 0, mn = 0;
		if (h->type != REDIS_REPLY_ARRAY)
			continue;
		for (size_t j = 0; j + 1 < h->elements; j += 2) {
			const redisReply *f = h->element[j], *v = h->element[j + 1];
			int64_t n;
			if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
			    hub_parse_i64(v->str, v->len, 0, INT64_MAX, &n))
				continue;
			add(states, by_type, f->str, n);
			if (!strchr(f->str, '|') && cmd_state_valid(f->str))
				*(final_state(f->str) ? &mf : &mn) += n;
		}
		if (mf || mn)
			json_array_append_new(per_minute,
				json_pack("{sIsIsI}", "t", (json_int_t)(c->first + (int64_t)i * CST_MINUTE_MS),
					  "final", (json_int_t)mf, "non_final", (json_int_t)mn));
		fin += mf;
		nonfin += mn;
	}
	json_object_set_new(o, "window", json_string(c->window));
	json_object_set_new(o, "from", json_integer(c->first));
	json_object_set_new(o, "to", json_integer(c->to));
	json_object_set_new(o, "states", states);
	json_object_set_new(o, "final", json_integer(fin));
	json_object_set_new(o, "non_final", json_integer(nonfin));
	json_object_set_new(o, "by_type", by_type);
	json_object_set_new(o, "per_minute", per_minute);
	char *txt = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
	json_decref(o);
	if (txt)
		hub_req_respond(rq, 200, "application/json", txt, strlen(txt));
	else
		hub_req_error(rq, 500, "internal", NULL, "out of memory");
	free(txt);
out:
	hub_req_unref(rq);
}

void cmd_stats_answer(struct cmd_stats *s, struct hub_req *rq, const struct hub_query *q)
{
	const char *w = hub_query_get(q, "window");
	int minutes = CST_MINUTES;

	if (!w)   /* the first of repeated parameters, as every route reads them */
		w = "1h";
	if (strcmp(w, "1h")) {
		int64_t n;
		size_t len = strlen(w);
		/* no leading zero: "05m" is not a window (the documented pattern) */
		if (len < 2 || w[len - 1] != 'm' || w[0] == '0' ||
		    hub_parse_i64(w, len - 1, 1, CST_MINUTES, &n)) {
			hub_req_error(rq, 422, "invalid", "window",
				      "window must be 1h or 1m to 60m");
			return;
		}
		minutes = (int)n;
	}
	if (!hub_req_who(rq)->devices.all) {
		hub_req_error(rq, 403, "forbidden", NULL,
			      "command statistics cover the whole fleet: they need a key without device patterns");
		return;
	}
	struct read_ctx *c = hub_xcalloc(1, sizeof(*c));
	hub_req_set_ctx(rq, c, free);
	c->minutes = minutes;
	c->to = hub_now_ms();
	c->first = c->to - c->to % CST_MINUTE_MS - (int64_t)(minutes - 1) * CST_MINUTE_MS;
	snprintf(c->window, sizeof(c->window), "%s", w);

	const char **argv = hub_xmalloc((size_t)(3 + minutes) * sizeof(*argv));
	char (*keys)[64] = hub_xmalloc((size_t)minutes * sizeof(*keys));
	char nk[8];
	snprintf(nk, sizeof(nk), "%d", minutes);
	argv[0] = "EVALSHA";
	argv[1] = hub_redis_script_sha(s->hub->redis, s->script_read);
	argv[2] = nk;
	for (int i = 0; i < minutes; i++) {
		hub_key_cstats(keys[i], sizeof(keys[i]), c->first + (int64_t)i * CST_MINUTE_MS);
		argv[3 + i] = keys[i];
	}
	hub_req_ref(rq);
	if (hub_redis_command_argv(s->hub->redis, on_read, rq, 3 + minutes, argv, NULL)) {
		hub_req_unref(rq);
		hub_req_error(rq, 503, "unavailable", NULL, "Redis is unavailable; retry later");
	}
	free(argv);
	free(keys);
}
