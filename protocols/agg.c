#include "protocols/agg.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>

#include "hub/events.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/strmap.h"
#include "hub_lua.h"

#define CATCHUP_PAGE     "512"
#define PEND_MAX         4096         /* live messages held during catch-up */
#define TICK_US          (100 * 1000)
#define FLUSH_DELAY_MS   100          /* after a second ends, before publishing */
#define MSG_MAX_BYTES    (32 * 1024)  /* partials per published message */
#define FLUSH_BUDGET     1000         /* partials published per loop turn */
#define FLUSH_AGAIN_US   (2 * 1000)   /* next turn when more were due */
#define KEY_MAX          (HUB_ID_MAX + 32)

const int64_t agg_window_ms[AGG__COUNT] = { 1000, 10000, 60000 };
const char *const agg_window_names[AGG__COUNT] = { "1s", "10s", "1m" };

/* Windows pending per map, keyed "<start>|<device>". */
struct window_map {
	hub_strmap states;
	int64_t next_due;          /* earliest deadline of any state; INT64_MAX: none */
};

/* The ingest partials of one second, in creation order: flushing takes them
 * from the front without scanning the map. */
struct due_second {
	int64_t start;
	struct agg_state *head, **tail;
	struct due_second *next;   /* later seconds */
};

struct agg {
	struct hub *hub;
	agg_emit_fn emit;                    /* the merged windows go here */
	void *emit_ctx;
	int script_publish;
	lws_sorted_usec_list_t sul;
	struct window_map partials;          /* ingest: this instance's 1 s partials */
	struct due_second *seconds;          /* the same partials by second, oldest first */
	struct window_map merged[AGG__COUNT]; /* merge side, per window */
	unsigned wants[AGG__COUNT];
	bool active;                         /* iot:live:agg subscription active */
	bool catching_up;                    /* reading iot:agg:partials after activation */
	unsigned gen;                        /* bumps on every (de)activation */
	uint64_t seen_ms, seen_seq;          /* newest partials message merged */
	char **pend;                         /* live messages held during catch-up */
	size_t npend;
	bool pend_overflow;
	hub_buf msg;
};

/* ---- state --------------------------------------------------------------- */

static struct agg_state *state_new(const char *device, const char *type, json_t *labels,
				   int64_t start)
{
	struct agg_state *st = hub_xcalloc(1, sizeof(*st));

	st->device = hub_xstrdup(device);
	st->type = hub_xstrdup(type);
	st->labels = labels ? json_incref(labels) : NULL;
	st->start = start;
	return st;
}

void agg_state_clear(struct agg_state *st)
{
	for (size_t i = 0; i < st->nfields; i++)
		free(st->fields[i].name);
	free(st->fields);
	free(st->device);
	free(st->type);
	free(st->labels_text);
	json_decref(st->labels);
	memset(st, 0, sizeof(*st));
}

static void state_free(struct agg_state *st)
{
	if (st->cache) {
		st->cache->p = NULL;
		st->cache->drop = NULL;
	}
	agg_state_clear(st);
	free(st);
}

/* The device's slot goes (hub_slot_drop): its partial forgets it. */
static void slot_drop(struct hub_slot *slot)
{
	struct agg_state *st = slot->p;

	if (st)
		st->cache = NULL;
}

static struct agg_field *field_get(struct agg_state *st, const char *name, size_t len)
{
	for (size_t i = 0; i < st->nfields; i++)
		if (!strncmp(st->fields[i].name, name, len) && !st->fields[i].name[len])
			return &st->fields[i];
	if (st->nfields == st->cap) {
		st->cap = st->cap ? st->cap * 2 : 4;
		st->fields = hub_xrealloc(st->fields, st->cap * sizeof(*st->fields));
	}
	struct agg_field *f = &st->fields[st->nfields++];
	memset(f, 0, sizeof(*f));
	f->name = hub_xmalloc(len + 1);
	memcpy(f->name, name, len);
	f->name[len] = '\0';
	return f;
}

/* Folds (count, min, max, sum, last@last_ts) into f. On equal timestamps
 * the value folded later wins: "later stored" within one instance. */
static void field_fold(struct agg_field *f, int64_t count, double min, double max,
		       double sum, double last, int64_t last_ts)
{
	if (!f->count || min < f->min)
		f->min = min;
	if (!f->count || max > f->max)
		f->max = max;
	if (!f->count || last_ts >= f->last_ts) {
		f->last = last;
		f->last_ts = last_ts;
	}
	f->count += count;
	f->sum += sum;
}

void agg_state_add(struct agg_state *st, const char *name, size_t len, double v, int64_t ts)
{
	if (!isfinite(v))
		return;
	field_fold(field_get(st, name, len), 1, v, v, v, v, ts);
}

void agg_state_merge(struct agg_state *dst, const struct agg_state *src)
{
	for (size_t i = 0; i < src->nfields; i++) {
		const struct agg_field *s = &src->fields[i];
		field_fold(field_get(dst, s->name, strlen(s->name)), s->count, s->min, s->max,
			   s->sum, s->last, s->last_ts);
	}
}

static void buf_double(hub_buf *b, double v)
{
	char num[32];
	int n;

	hub_buf_reserve(b, 32);
	if ((n = (int)hub_fmt_decimal(b->data + b->len, v))) {
		b->len += (size_t)n;
		return;
	}
	/* The shortest of %.15g/%.16g/%.17g that reads back as v: 23.47, not
	 * 23.469999999999999. */
	for (int prec = 15; prec <= 17; prec++) {
		n = snprintf(num, sizeof(num), "%.*g", prec, v);
		if (prec == 17 || strtod(num, NULL) == v)
			break;
	}
	hub_buf_append(b, num, (size_t)n);
}

/* Partials travel between hubs only: exact in one pass (%.17g reads back as
 * the same double), not the shortest form. */
static void buf_double_exact(hub_buf *b, double v)
{
	size_t n;

	hub_buf_reserve(b, 32);
	n = hub_fmt_decimal(b->data + b->len, v);
	b->len += n ? n : (size_t)snprintf(b->data + b->len, 32, "%.17g", v);
}

void agg_metrics_json(const struct agg_state *st, hub_buf *out)
{
	hub_buf_puts(out, "\"metrics\":{");
	for (size_t i = 0; i < st->nfields; i++) {
		const struct agg_field *f = &st->fields[i];
		if (i)
			hub_buf_puts(out, ",");
		hub_buf_json_str(out, f->name, strlen(f->name));
		hub_buf_puts(out, ":{\"count\":");
		hub_buf_i64(out, f->count);
		hub_buf_puts(out, ",\"min\":");
		buf_double(out, f->min);
		hub_buf_puts(out, ",\"max\":");
		buf_double(out, f->max);
		hub_buf_puts(out, ",\"avg\":");
		buf_double(out, f->sum / (double)f->count);
		hub_buf_puts(out, ",\"last\":");
		buf_double(out, f->last);
		hub_buf_puts(out, "}");
	}
	hub_buf_puts(out, "}");
}

static size_t make_key(char *key, int64_t start, const char *device)
{
	size_t n = hub_fmt_i64(key, start), dl = strlen(device);

	if (dl > KEY_MAX - n - 2)
		dl = KEY_MAX - n - 2;
	key[n++] = '|';
	memcpy(key + n, device, dl);
	key[n + dl] = '\0';
	return n + dl;
}

static void map_init(struct window_map *m)
{
	memset(&m->states, 0, sizeof(m->states));
	m->next_due = INT64_MAX;
}

static void free_state_cb(const char *key, void *value, void *arg)
{
	(void)key;
	(void)arg;
	state_free(value);
}

static void map_clear(struct window_map *m)
{
	hub_strmap_foreach(&m->states, free_state_cb, NULL);
	hub_strmap_free(&m->states);
	map_init(m);
}

/* Takes out every state whose deadline (start + span) is <= now into *out
 * (caller frees); recomputes next_due. */
struct due_ctx {
	int64_t now, span;
	struct agg_state **v;
	size_t n, cap;
	int64_t next_due;
};

static void collect_due_cb(const char *key, void *value, void *arg)
{
	struct due_ctx *d = arg;
	struct agg_state *st = value;

	(void)key;
	if (st->start + d->span <= d->now) {
		if (d->n == d->cap) {
			d->cap = d->cap ? d->cap * 2 : 64;
			d->v = hub_xrealloc(d->v, d->cap * sizeof(*d->v));
		}
		d->v[d->n++] = st;
	} else if (st->start + d->span < d->next_due) {
		d->next_due = st->start + d->span;
	}
}

static void map_take_due(struct window_map *m, int64_t now, int64_t span, struct due_ctx *d)
{
	char key[KEY_MAX];

	memset(d, 0, sizeof(*d));
	d->now = now;
	d->span = span;
	d->next_due = INT64_MAX;
	if (now < m->next_due)
		return;
	hub_strmap_foreach(&m->states, collect_due_cb, d);
	for (size_t i = 0; i < d->n; i++)
		hub_strmap_del(&m->states, key, make_key(key, d->v[i]->start, d->v[i]->device));
	m->next_due = d->next_due;
}

static int cmp_start(const void *a, const void *b)
{
	const struct agg_state *x = *(struct agg_state *const *)a, *y = *(struct agg_state *const *)b;

	return x->start < y->start ? -1 : x->start > y->start;
}

/* ---- ingest: this instance's 1 s partials -------------------------------- */

static int64_t max_age_ms(const struct agg *ag)
{
	return agg_window_ms[AGG_1M] + ag->hub->cfg.aggregate_grace_ms + 1000;
}

static void due_append(struct agg *ag, struct agg_state *st)
{
	struct due_second **pp = &ag->seconds, *sec;

	while (*pp && (*pp)->start < st->start)
		pp = &(*pp)->next;
	sec = *pp;
	if (!sec || sec->start != st->start) {
		sec = hub_xcalloc(1, sizeof(*sec));
		sec->start = st->start;
		sec->tail = &sec->head;
		sec->next = *pp;
		*pp = sec;
	}
	*sec->tail = st;
	sec->tail = &st->due_next;
}

/* The partial of device for the second holding ts (created on first use),
 * or NULL when ts is too old to be aggregated. labels is the device's labels
 * as compact JSON. slot (may be NULL) is the device's cache of its current
 * partial: a hit skips the map lookup. */
static struct agg_state *partial(struct agg *ag, const char *device, const char *type,
				 const char *labels, size_t labels_len, int64_t ts,
				 struct hub_slot *slot)
{
	char key[KEY_MAX];
	int64_t start = ts - ((ts % 1000) + 1000) % 1000;
	size_t kl;
	struct agg_state *st;

	if (slot && slot->p && ((struct agg_state *)slot->p)->start == start)
		return slot->p;
	if (ts < hub_now_ms() - max_age_ms(ag)) {
		ag->hub->metrics.aggregate_late_readings_total++;
		return NULL;
	}
	kl = make_key(key, start, device);
	st = hub_strmap_get(&ag->partials.states, key, kl);
	if (!st) {
		/* Ingest partials keep the labels as the text they came in (already
		 * compact JSON): no parse per device per second. */
		st = state_new(device, type, NULL, start);
		st->labels_text = hub_xmalloc(labels_len + 1);
		memcpy(st->labels_text, labels ? labels : "", labels_len);
		st->labels_text[labels_len] = '\0';
		hub_strmap_put(&ag->partials.states, key, kl, st);
		due_append(ag, st);
	}
	/* One slot per state: a second connection holding the same device (a
	 * takeover in progress) looks it up instead. */
	if (slot && !st->cache) {
		hub_slot_drop(slot);
		slot->p = st;
		slot->drop = slot_drop;
		st->cache = slot;
	}
	return st;
}

/* Stored readings: their numeric fields go into this instance's 1 s
 * partials. */
static void on_readings_stored(struct hub *hub, enum hub_event ev, const void *payload,
			       void *ctx)
{
	const struct hub_ev_readings *rs = payload;
	struct agg *ag = ctx;

	(void)hub;
	(void)ev;
	for (size_t i = 0; i < rs->n; i++) {
		const struct hub_ev_reading *r = &rs->v[i];
		struct agg_state *st;

		if (!r->nfields)
			continue;
		st = partial(ag, r->device, r->type, r->labels, r->labels_len, r->ts, r->slot);
		for (size_t j = 0; st && j < r->nfields; j++)
			agg_state_add(st, r->fields[j].name, r->fields[j].len, r->fields[j].value,
				      r->ts);
	}
}

static void msg_begin(struct agg *ag)
{
	ag->msg.len = 0;
	hub_buf_puts(&ag->msg, "{\"instance\":");
	hub_buf_json_str(&ag->msg, ag->hub->instance_id, strlen(ag->hub->instance_id));
	hub_buf_puts(&ag->msg, ",\"partials\":[");
}

/* Publishes the partials message (hub/lua/agg_publish.lua). */
static void msg_send(struct agg *ag)
{
	char minid[24];
	const char *argv[6];
	size_t lens[6];

	hub_buf_puts(&ag->msg, "]}");
	snprintf(minid, sizeof(minid), "%lld", (long long)(hub_now_ms() - 2 * max_age_ms(ag)));
	argv[0] = "EVALSHA";
	argv[1] = hub_redis_script_sha(ag->hub->redis, ag->script_publish);
	argv[2] = "1";
	argv[3] = HUB_KEY_AGG_PARTIALS;
	argv[4] = HUB_CH_AGG;
	argv[5] = minid;
	for (int i = 0; i < 6; i++)
		lens[i] = strlen(argv[i]);
	const char *full[7] = { argv[0], argv[1], argv[2], argv[3], argv[4], argv[5], ag->msg.data };
	size_t flens[7] = { lens[0], lens[1], lens[2], lens[3], lens[4], lens[5], ag->msg.len };
	hub_redis_command_argv(ag->hub->redis, NULL, NULL, 7, full, flens); /* lost while down */
}

/* Publishes due partials, at most FLUSH_BUDGET per loop turn so a hub with
 * many devices never stalls its loop for the whole set at once. Returns true
 * when more are due. */
static bool flush_partials(struct agg *ag, int64_t now)
{
	size_t in_msg = 0, taken = 0;
	char key[KEY_MAX];

	if (!ag->seconds || ag->seconds->start + 1000 + FLUSH_DELAY_MS > now)
		return false;
	msg_begin(ag);
	while (ag->seconds && ag->seconds->start + 1000 + FLUSH_DELAY_MS <= now &&
	       taken < FLUSH_BUDGET) {
		struct due_second *sec = ag->seconds;
		struct agg_state *st = sec->head;

		if (!st) {
			ag->seconds = sec->next;
			free(sec);
			continue;
		}
		sec->head = st->due_next;
		if (!sec->head)
			sec->tail = &sec->head;
		hub_strmap_del(&ag->partials.states, key, make_key(key, st->start, st->device));
		taken++;
		const char *labels = st->labels_text && *st->labels_text ? st->labels_text : "{}";

		if (in_msg)
			hub_buf_puts(&ag->msg, ",");
		hub_buf_puts(&ag->msg, "{\"device\":");
		hub_buf_json_str(&ag->msg, st->device, strlen(st->device));
		hub_buf_puts(&ag->msg, ",\"type\":");
		hub_buf_json_str(&ag->msg, st->type, strlen(st->type));
		hub_buf_puts(&ag->msg, ",\"labels\":");
		hub_buf_puts(&ag->msg, labels);
		hub_buf_puts(&ag->msg, ",\"start\":");
		hub_buf_i64(&ag->msg, st->start);
		hub_buf_puts(&ag->msg, ",\"fields\":{");
		for (size_t j = 0; j < st->nfields; j++) {
			const struct agg_field *f = &st->fields[j];
			if (j)
				hub_buf_puts(&ag->msg, ",");
			hub_buf_json_str(&ag->msg, f->name, strlen(f->name));
			hub_buf_puts(&ag->msg, ":[");
			hub_buf_i64(&ag->msg, f->count);
			hub_buf_puts(&ag->msg, ",");
			buf_double_exact(&ag->msg, f->min);
			hub_buf_puts(&ag->msg, ",");
			buf_double_exact(&ag->msg, f->max);
			hub_buf_puts(&ag->msg, ",");
			buf_double_exact(&ag->msg, f->sum);
			hub_buf_puts(&ag->msg, ",");
			buf_double_exact(&ag->msg, f->last);
			hub_buf_puts(&ag->msg, ",");
			hub_buf_i64(&ag->msg, f->last_ts);
			hub_buf_puts(&ag->msg, "]");
		}
		hub_buf_puts(&ag->msg, "}}");
		state_free(st);
		in_msg++;
		if (ag->msg.len > MSG_MAX_BYTES) {
			msg_send(ag);
			msg_begin(ag);
			in_msg = 0;
		}
	}
	if (in_msg)
		msg_send(ag);
	if (ag->msg.cap > 4 * MSG_MAX_BYTES)
		hub_buf_free(&ag->msg);
	while (ag->seconds && !ag->seconds->head) {
		struct due_second *sec = ag->seconds;
		ag->seconds = sec->next;
		free(sec);
	}
	return ag->seconds && ag->seconds->start + 1000 + FLUSH_DELAY_MS <= now;
}

/* ---- merge side ---------------------------------------------------------- */

void agg_want(struct agg *ag, enum agg_window w, bool want)
{
	if (want)
		ag->wants[w]++;
	else if (ag->wants[w])
		ag->wants[w]--;
}

static void pend_clear(struct agg *ag)
{
	for (size_t i = 0; i < ag->npend; i++)
		free(ag->pend[i]);
	free(ag->pend);
	ag->pend = NULL;
	ag->npend = 0;
	ag->pend_overflow = false;
}

static void catchup_next(struct agg *ag);
static void merge_message(struct agg *ag, const char *payload, size_t len, int64_t now);

/* A catch-up page in flight: stale once the subscription cycled. */
struct catchup {
	struct agg *ag;
	unsigned gen;
};

static void on_catchup_page(redisReply *reply, void *arg)
{
	struct catchup *cu = arg;
	struct agg *ag = cu->ag;
	bool stale = cu->gen != ag->gen;
	int64_t now = hub_now_ms();
	size_t n;

	free(cu);
	if (stale || !ag->catching_up)
		return;
	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		ag->catching_up = false; /* Redis trouble: the pub/sub side will cycle */
		pend_clear(ag);
		return;
	}
	n = reply->elements;
	for (size_t i = 0; i < n; i++) {
		redisReply *e = reply->element[i];
		if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
		    e->element[0]->type != REDIS_REPLY_STRING ||
		    e->element[1]->type != REDIS_REPLY_ARRAY || e->element[1]->elements != 2 ||
		    e->element[1]->element[1]->type != REDIS_REPLY_STRING)
			continue;
		hub_buf b = { 0 };
		hub_buf_append(&b, e->element[0]->str, e->element[0]->len);
		hub_buf_append(&b, "\n", 1);
		hub_buf_append(&b, e->element[1]->element[1]->str, e->element[1]->element[1]->len);
		merge_message(ag, b.data, b.len, now);
		hub_buf_free(&b);
	}
	if (n >= (size_t)atoi(CATCHUP_PAGE) || ag->pend_overflow) {
		catchup_next(ag);
		return;
	}
	/* Caught up: what arrived live meanwhile, after the seam, then live. */
	ag->catching_up = false;
	char **v = ag->pend;
	size_t np = ag->npend;
	ag->pend = NULL;
	ag->npend = 0;
	for (size_t i = 0; i < np; i++) {
		merge_message(ag, v[i], strlen(v[i]), now);
		free(v[i]);
	}
	free(v);
}

static void catchup_next(struct agg *ag)
{
	char start[48];
	const char *argv[6] = { "XRANGE", HUB_KEY_AGG_PARTIALS, start, "+", "COUNT", CATCHUP_PAGE };

	pend_clear(ag); /* all of them are at or before what this page sees */
	snprintf(start, sizeof(start), "(%llu-%llu", (unsigned long long)ag->seen_ms,
		 (unsigned long long)ag->seen_seq);
	struct catchup *cu = hub_xmalloc(sizeof(*cu));
	*cu = (struct catchup){ ag, ag->gen };
	if (hub_redis_command_argv(ag->hub->redis, on_catchup_page, cu, 6, argv, NULL)) {
		free(cu);
		ag->catching_up = false;
	}
}

void agg_set_active(struct agg *ag, bool active)
{
	ag->gen++;
	ag->active = active;
	ag->catching_up = false;
	pend_clear(ag);
	for (int w = 0; w < AGG__COUNT; w++)
		map_clear(&ag->merged[w]); /* rebuilt from the stream below */
	if (!active)
		return;
	/* Every window still to be emitted started after this point. */
	ag->seen_ms = (uint64_t)(hub_now_ms() - max_age_ms(ag));
	ag->seen_seq = 0;
	ag->catching_up = true;
	catchup_next(ag);
}

static int parse_field(json_t *arr, struct agg_field *f)
{
	if (!json_is_array(arr) || json_array_size(arr) != 6)
		return -1;
	for (size_t i = 0; i < 6; i++)
		if (!json_is_number(json_array_get(arr, i)))
			return -1;
	f->count = (int64_t)json_number_value(json_array_get(arr, 0));
	f->min = json_number_value(json_array_get(arr, 1));
	f->max = json_number_value(json_array_get(arr, 2));
	f->sum = json_number_value(json_array_get(arr, 3));
	f->last = json_number_value(json_array_get(arr, 4));
	f->last_ts = (int64_t)json_number_value(json_array_get(arr, 5));
	return f->count > 0 ? 0 : -1;
}

static void merge_partial(struct agg *ag, json_t *p, int64_t now)
{
	json_t *dev = json_object_get(p, "device"), *type = json_object_get(p, "type"),
	       *labels = json_object_get(p, "labels"), *start = json_object_get(p, "start"),
	       *fields = json_object_get(p, "fields");
	int64_t s;
	const char *k;
	json_t *v;

	if (!json_is_string(dev) || !json_is_string(type) || !json_is_integer(start) ||
	    !json_is_object(fields) || (labels && !json_is_object(labels)))
		return;
	s = json_integer_value(start);
	for (int w = 0; w < AGG__COUNT; w++) {
		int64_t span = agg_window_ms[w], ws = s - ((s % span) + span) % span;
		int64_t due = ws + span + ag->hub->cfg.aggregate_grace_ms;
		char key[KEY_MAX];
		size_t kl;
		struct agg_state *st;

		if (due <= now) {
			ag->hub->metrics.aggregate_late_partials_total++;
			continue;
		}
		kl = make_key(key, ws, json_string_value(dev));
		st = hub_strmap_get(&ag->merged[w].states, key, kl);
		if (!st) {
			st = state_new(json_string_value(dev), json_string_value(type), labels, ws);
			hub_strmap_put(&ag->merged[w].states, key, kl, st);
			if (due < ag->merged[w].next_due)
				ag->merged[w].next_due = due;
		}
		json_object_foreach(fields, k, v) {
			struct agg_field f;
			if (parse_field(v, &f))
				continue;
			field_fold(field_get(st, k, strlen(k)), f.count, f.min, f.max, f.sum,
				   f.last, f.last_ts);
		}
	}
}

/* payload: `<stream id>\n<JSON>`; merged once (ids only grow). */
static void merge_message(struct agg *ag, const char *payload, size_t len, int64_t now)
{
	const char *nl = memchr(payload, '\n', len);
	unsigned long long ms, seq;
	char idbuf[48];
	json_t *doc, *parts;
	size_t il;

	if (!nl || (il = (size_t)(nl - payload)) >= sizeof(idbuf))
		return;
	memcpy(idbuf, payload, il);
	idbuf[il] = '\0';
	if (sscanf(idbuf, "%llu-%llu", &ms, &seq) != 2)
		return;
	if (ms < ag->seen_ms || (ms == ag->seen_ms && seq <= ag->seen_seq))
		return; /* merged already (the catch-up seam) */
	ag->seen_ms = ms;
	ag->seen_seq = seq;
	doc = json_loadb(nl + 1, len - il - 1, 0, NULL);
	parts = json_object_get(doc, "partials");
	for (size_t i = 0; i < json_array_size(parts); i++)
		merge_partial(ag, json_array_get(parts, i), now);
	json_decref(doc);
}

void agg_on_partials(struct agg *ag, const char *payload, size_t len)
{
	if (!ag->active)
		return;
	if (ag->catching_up) {
		if (ag->npend >= PEND_MAX) {
			ag->pend_overflow = true; /* in the stream: the next page has it */
			return;
		}
		ag->pend = hub_xrealloc(ag->pend, (ag->npend + 1) * sizeof(*ag->pend));
		ag->pend[ag->npend] = hub_xmalloc(len + 1);
		memcpy(ag->pend[ag->npend], payload, len);
		ag->pend[ag->npend][len] = '\0';
		ag->npend++;
		return;
	}
	merge_message(ag, payload, len, hub_now_ms());
}

static void emit_due(struct agg *ag, int64_t now)
{
	for (int w = 0; w < AGG__COUNT; w++) {
		struct due_ctx d;

		if (!ag->active || ag->catching_up)
			continue; /* windows wait for the catch-up (they are not due yet) */
		map_take_due(&ag->merged[w], now,
			     agg_window_ms[w] + ag->hub->cfg.aggregate_grace_ms, &d);
		if (!d.n)
			continue;
		qsort(d.v, d.n, sizeof(*d.v), cmp_start);
		for (size_t i = 0; i < d.n && ag->wants[w];) {
			size_t j = i;
			while (j < d.n && d.v[j]->start == d.v[i]->start)
				j++;
			if (ag->emit)
				ag->emit(ag->emit_ctx, (enum agg_window)w, d.v[i]->start,
					 d.v + i, j - i);
			i = j;
		}
		for (size_t i = 0; i < d.n; i++)
			state_free(d.v[i]);
		free(d.v);
	}
}

/* ---- timer --------------------------------------------------------------- */

static void tick_cb(lws_sorted_usec_list_t *sul)
{
	struct agg *ag = lws_container_of(sul, struct agg, sul);
	int64_t now = hub_now_ms();
	bool more = flush_partials(ag, now);

	emit_due(ag, now);
	lws_sul_schedule(ag->hub->ctx, 0, &ag->sul, tick_cb, more ? FLUSH_AGAIN_US : TICK_US);
}

struct agg *agg_new(struct hub *hub)
{
	struct agg *ag = hub_xcalloc(1, sizeof(*ag));

	ag->hub = hub;
	ag->script_publish = hub_redis_add_script(hub->redis, hub_lua_agg_publish);
	map_init(&ag->partials);
	for (int w = 0; w < AGG__COUNT; w++)
		map_init(&ag->merged[w]);
	lws_sul_schedule(hub->ctx, 0, &ag->sul, tick_cb, TICK_US);
	return ag;
}

void agg_set_emit(struct agg *ag, agg_emit_fn emit, void *ctx)
{
	ag->emit = emit;
	ag->emit_ctx = ctx;
}

void agg_stop(struct agg *ag)
{
	if (ag)
		lws_sul_cancel(&ag->sul);
}

void agg_free(struct agg *ag)
{
	if (!ag)
		return;
	map_clear(&ag->partials);
	while (ag->seconds) {
		struct due_second *sec = ag->seconds;
		ag->seconds = sec->next;
		free(sec);
	}
	for (int w = 0; w < AGG__COUNT; w++)
		map_clear(&ag->merged[w]);
	hub_buf_free(&ag->msg);
	pend_clear(ag);
	free(ag);
}

/* ---- the module ---------------------------------------------------------- */

static int agg_module_start(struct hub *hub, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	hub->agg = agg_new(hub);
	hub_observe(hub, HUB_EV_READINGS_STORED, on_readings_stored, hub->agg);
	return 0;
}

static void agg_module_stop(struct hub *hub)
{
	agg_stop(hub->agg);
}

static void agg_module_free(struct hub *hub)
{
	agg_free(hub->agg);
	hub->agg = NULL;
}

const struct hub_module agg_module = {
	.name = "agg",
	.start = agg_module_start,
	.stop = agg_module_stop,
	.free = agg_module_free,
};
