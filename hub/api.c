/*
 * api.c - GET /v1/devices, /v1/devices/{device}, /v1/devices/{device}/telemetry
 * (docs/protocol.md "Devices and telemetry"; the Redis layout is
 * docs/streams.md). See api.h.
 *
 * Every Redis command holds a reference on its request (cmd()); a reply
 * callback does nothing but drop it once the request is gone. Replies on the
 * command connection arrive in the order the commands were sent, which the
 * pipelined HGETALLs of the device list rely on.
 */
#include "hub/api.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "hub/hub.h"
#include "hub/ingest.h"
#include "hub/keys.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/slot.h"
#include "hub/util.h"

#define LIST_MAX_IDS 10000    /* device ids considered by one list request */
#define LIST_BATCH 256        /* HGETALLs in flight per list request */
#define LIST_LIMIT_DEFAULT 100
#define LIST_LIMIT_MAX 1000
#define LIST_MAX_LABELS 16
#define TM_PAGE 500           /* XRANGE COUNT at most */
#define TM_PAGE_MIN 8
#define TM_PAGE_BYTES (512 * 1024) /* a page's output above this halves COUNT */
#define TM_JSON_MAX_BYTES (16 * 1024 * 1024) /* a json answer stops here (with next) */
#define TM_SKEW_MS 300000     /* stream ids scanned around [from, to] */
#define TM_JSON_LIMIT_DEFAULT 1000
#define TM_JSON_LIMIT_MAX 100000

/* ---- helpers -------------------------------------------------------------- */

/* Strict decimal integer in [min, max] (hub_parse_i64: no sign '+', no
 * spaces, no overflow). Returns 0 or -1. */
static int cmd(struct hub_req *rq, hub_redis_cb cb, int argc, const char **argv)
{
	hub_req_ref(rq);
	if (hub_redis_command_argv(hub_req_hub(rq)->redis, cb, rq, argc, argv, NULL)) {
		hub_req_unref(rq);
		return -1;
	}
	return 0;
}

static bool visible(struct hub_req *rq, const char *device)
{
	return auth_patterns_match(&hub_req_who(rq)->devices, device);
}

static const redisReply *field(const redisReply *kv, const char *name)
{
	if (!kv || kv->type != REDIS_REPLY_ARRAY)
		return NULL;
	for (size_t i = 0; i + 1 < kv->elements; i += 2) {
		const redisReply *k = kv->element[i];
		if (k->type == REDIS_REPLY_STRING && !strcmp(k->str, name) &&
		    kv->element[i + 1]->type == REDIS_REPLY_STRING)
			return kv->element[i + 1];
	}
	return NULL;
}

static char *field_dup(const redisReply *kv, const char *name)
{
	const redisReply *v = field(kv, name);
	return v ? hub_xstrdup(v->str) : NULL;
}

/* ---- one registry row ----------------------------------------------------- */

struct dev_row {
	char *id;
	bool exists;
	char *type, *gateway;
	json_t *labels;   /* object (never NULL when exists) */
	bool online;
	long long last_seen;
	bool has_last_seen;
};

static void row_clear(struct dev_row *r)
{
	free(r->id);
	free(r->type);
	free(r->gateway);
	json_decref(r->labels);
	memset(r, 0, sizeof(*r));
}

/* Fills r from an HGETALL reply (r->id set by the caller). */
static void row_fill(struct dev_row *r, const redisReply *h)
{
	const redisReply *v;

	r->exists = h && h->type == REDIS_REPLY_ARRAY && h->elements > 0;
	if (!r->exists)
		return;
	r->type = field_dup(h, "type");
	r->gateway = field_dup(h, "gateway");
	v = field(h, "labels");
	if (v)
		r->labels = json_loadb(v->str, v->len, 0, NULL);
	if (!json_is_object(r->labels)) {
		json_decref(r->labels);
		r->labels = json_object();
	}
	v = field(h, "online");
	r->online = v && !strcmp(v->str, "1");
	v = field(h, "last_seen");
	r->has_last_seen = v && !hub_parse_ll(v->str, 0, INT64_MAX, &r->last_seen);
}

static void row_json(hub_buf *o, const struct dev_row *r)
{
	hub_buf_puts(o, "{\"device\":");
	hub_buf_json_str(o, r->id, strlen(r->id));
	hub_buf_puts(o, ",\"device_type\":");
	if (r->type)
		hub_buf_json_str(o, r->type, strlen(r->type));
	else
		hub_buf_puts(o, "null");
	hub_buf_puts(o, ",\"labels\":");
	char *l = json_dumps(r->labels, JSON_COMPACT | JSON_SORT_KEYS);
	hub_buf_puts(o, l ? l : "{}");
	free(l);
	hub_buf_puts(o, ",\"gateway\":");
	if (r->gateway)
		hub_buf_json_str(o, r->gateway, strlen(r->gateway));
	else
		hub_buf_puts(o, "null");
	hub_buf_printf(o, ",\"online\":%s,\"last_seen\":", r->online ? "true" : "false");
	if (r->has_last_seen)
		hub_buf_printf(o, "%lld}", r->last_seen);
	else
		hub_buf_puts(o, "null}");
}

/* One stream entry [id, [k, v, ...]] as {"ts":..,"data":..,"pos":".."}; with
 * csv, as `ts,pos,"data"` CRLF. Returns false (nothing written) when the entry
 * is malformed or its ts is outside [from, to]. */
static bool entry_out_fields(hub_buf *o, const char *pos, const char *tss, const char *data,
			     size_t data_len, long long from, long long to, bool csv)
{
	long long ts;
	if (!tss || hub_parse_ll(tss, 0, INT64_MAX, &ts) || ts < from || ts > to)
		return false;
	if (csv) {
		hub_buf_printf(o, "%lld,%s,\"", ts, pos);
		if (data) {
			for (size_t i = 0; i < data_len; i++) {
				if (data[i] == '"')
					hub_buf_append(o, "\"", 1);
				hub_buf_append(o, data + i, 1);
			}
		} else {
			hub_buf_puts(o, "null");
		}
		hub_buf_puts(o, "\"\r\n");
		return true;
	}
	hub_buf_printf(o, "{\"ts\":%lld,\"data\":", ts);
	if (data && data_len)
		hub_buf_append(o, data, data_len); /* compact JSON, as stored */
	else
		hub_buf_puts(o, "null");
	hub_buf_puts(o, ",\"pos\":");
	hub_buf_json_str(o, pos, strlen(pos));
	hub_buf_puts(o, "}");
	return true;
}

static bool entry_out(hub_buf *o, const redisReply *e, long long from, long long to,
		      bool csv)
{
	if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
	    e->element[0]->type != REDIS_REPLY_STRING)
		return false;
	const redisReply *tsr = field(e->element[1], "ts"), *data = field(e->element[1], "data");
	const redisReply *anom = field(e->element[1], "anom");
	if (!entry_out_fields(o, e->element[0]->str, tsr ? tsr->str : NULL,
			      data ? data->str : NULL, data ? data->len : 0, from, to, csv))
		return false;
	if (anom && anom->type == REDIS_REPLY_STRING && !csv) {
		/* the reading's anomaly flags (docs/anomalies.md), as stored */
		o->len--;
		hub_buf_puts(o, ",\"anomalies\":");
		hub_buf_append(o, anom->str, anom->len);
		hub_buf_puts(o, "}");
	}
	return true;
}

/* A stream entry's id "<ms>-<n>" as a pair (0-0 when it is not one). */
static void entry_id(const redisReply *e, uint64_t *ms, uint64_t *seq)
{
	*ms = *seq = 0;
	if (e->type == REDIS_REPLY_ARRAY && e->elements == 2 &&
	    e->element[0]->type == REDIS_REPLY_STRING)
		hub_parse_pos(e->element[0]->str, e->element[0]->len, false, ms, seq);
}

/* ---- GET /v1/devices ------------------------------------------------------ */

struct list_ctx {
	char *type;                    /* device_type filter or NULL */
	int online;                    /* -1: any */
	size_t nlabels;
	char *lk[LIST_MAX_LABELS], *lv[LIST_MAX_LABELS];
	long long limit;
	unsigned char *slots;          /* the slot directory (HUB_KEY_SLOTS) */
	size_t nslots_bytes;
	unsigned next_slot;            /* the next slot whose index is read */
	size_t inflight;               /* index reads in flight */
	size_t considered;
	char **ids;
	size_t nids, cap_ids, next;
	bool truncated, failed;
	/* paging (a cursor= parameter): the walk goes slot by slot, ids by id
	 * within a slot, and resumes after the position (slot of after, after) */
	bool paged, cap_hit;
	char *after;                   /* the cursor's device id, NULL: the start */
	char *last_out;                /* the last row answered */
	size_t batch_n, batch_got;
	struct dev_row rows[LIST_BATCH];
	long long matched;
	hub_buf out;
};

static void list_free(void *p)
{
	struct list_ctx *c = p;

	free(c->type);
	free(c->slots);
	free(c->after);
	free(c->last_out);
	for (size_t i = 0; i < c->nlabels; i++) {
		free(c->lk[i]);
		free(c->lv[i]);
	}
	for (size_t i = 0; i < c->nids; i++)
		free(c->ids[i]);
	free(c->ids);
	for (size_t i = 0; i < LIST_BATCH; i++)
		row_clear(&c->rows[i]);
	hub_buf_free(&c->out);
	free(c);
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void list_fail(struct hub_req *rq, struct list_ctx *c, const redisReply *r)
{
	c->failed = true;
	hub_req_redis_failed(rq, r);
}

static bool list_match(const struct list_ctx *c, const struct dev_row *r)
{
	if (!r->exists)
		return false;
	if (c->type && (!r->type || strcmp(r->type, c->type)))
		return false;
	if (c->online >= 0 && r->online != (c->online == 1))
		return false;
	for (size_t i = 0; i < c->nlabels; i++) {
		const char *v = json_string_value(json_object_get(r->labels, c->lk[i]));
		if (!v || strcmp(v, c->lv[i]))
			return false;
	}
	return true;
}

/* A cursor is the hex of the device id a page ended with: opaque to
 * clients, and stable (the position of that id, not an offset). */
static void cursor_out(hub_buf *o, const char *id)
{
	static const char hex[] = "0123456789abcdef";

	hub_buf_puts(o, "\"");
	for (const unsigned char *p = (const unsigned char *)id; *p; p++) {
		char two[2] = { hex[*p >> 4], hex[*p & 15] };
		hub_buf_append(o, two, 2);
	}
	hub_buf_puts(o, "\"");
}

/* The device id of a cursor (malloc'd), or NULL when it is not one. */
static char *cursor_in(const char *s)
{
	size_t n = strlen(s);
	char *id;

	/* lower case only, as cursor_out writes it */
	if (!n || n % 2 || n > 2 * HUB_ID_MAX || strspn(s, "0123456789abcdef") != n)
		return NULL;
	id = hub_xmalloc(n / 2 + 1);
	id[n / 2] = '\0';
	if (hub_unhex(s, n, (uint8_t *)id, n / 2) || !hub_id_valid(id, n / 2)) {
		free(id);
		return NULL;
	}
	return id;
}

static void list_finish(struct hub_req *rq, struct list_ctx *c)
{
	if (c->paged) {
		/* more to read: after the last row answered (a full page), or
		 * after the last id considered (the work cap came first) */
		const char *next = c->truncated ? c->last_out :
				   c->cap_hit && c->nids ? c->ids[c->nids - 1] : NULL;
		hub_buf_printf(&c->out, "],\"truncated\":%s,\"next_cursor\":", next ? "true" : "false");
		if (next)
			cursor_out(&c->out, next);
		else
			hub_buf_puts(&c->out, "null");
		hub_buf_puts(&c->out, "}");
	} else {
		hub_buf_printf(&c->out, "],\"truncated\":%s}", c->truncated ? "true" : "false");
	}
	hub_req_respond(rq, 200, "application/json", c->out.data, c->out.len);
	hub_buf_free(&c->out);
}

static void list_on_hgetall(redisReply *r, void *arg);

/* One HGETALL of a batch: its row (replies of a cluster's several
 * primaries do not come in one order). */
struct row_call {
	struct hub_req *rq;
	size_t idx;
};

static void list_walk_paged(struct hub_req *rq, struct list_ctx *c);

static void list_next_batch(struct hub_req *rq, struct list_ctx *c)
{
	if (c->next >= c->nids) {
		if (c->paged && !c->cap_hit && c->next_slot < HUB_SLOTS) {
			/* the page is not full: the next round of slots */
			for (size_t i = 0; i < c->nids; i++)
				free(c->ids[i]);
			c->nids = c->next = 0;
			list_walk_paged(rq, c);
			return;
		}
		list_finish(rq, c);
		return;
	}
	c->batch_n = c->nids - c->next < LIST_BATCH ? c->nids - c->next : LIST_BATCH;
	c->batch_got = 0;
	for (size_t i = 0; i < c->batch_n; i++) {
		char key[HUB_KEY_MAX];
		struct dev_row *row = &c->rows[i];
		row_clear(row);
		row->id = hub_xstrdup(c->ids[c->next + i]);
		hub_key_dev(key, sizeof(key), row->id);   /* ids were checked when listed */
		const char *argv[] = { "HGETALL", key };
		struct row_call *rc = hub_xmalloc(sizeof(*rc));
		rc->rq = rq;
		rc->idx = i;
		hub_req_ref(rq);
		if (hub_redis_command_argv(hub_req_hub(rq)->redis, list_on_hgetall, rc, 2, argv,
					   NULL)) {
			hub_req_unref(rq);
			free(rc);
			/* Earlier commands of this batch still answer (with NULL). */
			list_fail(rq, c, NULL);
			return;
		}
	}
	c->next += c->batch_n;
}

static void list_on_hgetall(redisReply *r, void *arg)
{
	struct row_call *rc = arg;
	struct hub_req *rq = rc->rq;
	struct list_ctx *c = hub_req_ctx(rq);
	size_t idx = rc->idx;

	free(rc);
	if (hub_req_gone(rq) || c->failed)
		goto out;
	if (!r || (r->type != REDIS_REPLY_ARRAY)) {
		list_fail(rq, c, r);
		goto out;
	}
	row_fill(&c->rows[idx], r);
	if (++c->batch_got < c->batch_n)
		goto out;
	for (size_t i = 0; i < c->batch_n; i++) {
		if (!list_match(c, &c->rows[i]))
			continue;
		if (c->matched == c->limit) { /* one more than asked: say so */
			c->truncated = true;
			list_finish(rq, c);
			goto out;
		}
		if (c->matched++)
			hub_buf_puts(&c->out, ",");
		row_json(&c->out, &c->rows[i]);
		if (c->paged) {
			free(c->last_out);
			c->last_out = hub_xstrdup(c->rows[i].id);
		}
	}
	list_next_batch(rq, c);
out:
	hub_req_unref(rq);
}

/* The walk over the slot-local indexes (docs/streams.md "Key names"):
 * the slot directory (HUB_KEY_SLOTS) says which slots hold devices; the
 * index of each (iot:idx:{<tag>}:devices, or :type:<type> with a type
 * filter) is read with SMEMBERS, LIST_WALK at a time, until every marked
 * slot was read or LIST_MAX_IDS ids were considered. */
#define LIST_WALK 64

static void list_on_members(redisReply *r, void *arg);

/* Paging: ids in walk order, (slot, id). */
struct slot_id {
	unsigned slot;
	char *id;
};

static int cmp_slot_id(const void *a, const void *b)
{
	const struct slot_id *x = a, *y = b;

	if (x->slot != y->slot)
		return x->slot < y->slot ? -1 : 1;
	return strcmp(x->id, y->id);
}

/* A round of the paged walk is in: its ids in (slot, id) order, those at
 * or before the cursor dropped, at most what is left of LIST_MAX_IDS kept
 * (a prefix: the next cursor is the last one kept). */
static void list_sorted_paged(struct hub_req *rq, struct list_ctx *c)
{
	struct slot_id *v = hub_xmalloc((c->nids ? c->nids : 1) * sizeof(*v));
	unsigned aslot = c->after ? hub_dev_slot(c->after) : 0;
	size_t w = 0, room = LIST_MAX_IDS - c->considered;

	for (size_t i = 0; i < c->nids; i++) {
		v[i].slot = hub_dev_slot(c->ids[i]);
		v[i].id = c->ids[i];
	}
	if (c->nids > 1)
		qsort(v, c->nids, sizeof(*v), cmp_slot_id);
	for (size_t i = 0; i < c->nids; i++) {
		bool drop = (w && !strcmp(c->ids[w - 1], v[i].id)) ||
			    (c->after && (v[i].slot < aslot ||
					  (v[i].slot == aslot && strcmp(v[i].id, c->after) <= 0)));
		if (!drop && w == room) {
			c->cap_hit = true;
			drop = true;
		}
		if (drop)
			free(v[i].id);
		else
			c->ids[w++] = v[i].id;
	}
	free(v);
	c->nids = w;
	c->considered += w;
	if (c->considered == LIST_MAX_IDS && c->next_slot < HUB_SLOTS)
		c->cap_hit = true;
	list_next_batch(rq, c);
}

static void list_sorted(struct hub_req *rq, struct list_ctx *c)
{
	if (c->paged) {
		list_sorted_paged(rq, c);
		return;
	}
	/* Sorted by id; the indexes do not overlap, but be safe. */
	if (c->nids > 1)
		qsort(c->ids, c->nids, sizeof(*c->ids), cmp_str);
	size_t w = 0;
	for (size_t i = 0; i < c->nids; i++) {
		if (w && !strcmp(c->ids[w - 1], c->ids[i]))
			free(c->ids[i]);
		else
			c->ids[w++] = c->ids[i];
	}
	c->nids = w;
	list_next_batch(rq, c);
}

static bool slot_marked(const struct list_ctx *c, unsigned s)
{
	/* SETBIT numbers bits from the most significant of the first byte. */
	return s / 8 < c->nslots_bytes && (c->slots[s / 8] & (0x80u >> (s % 8)));
}

/* The index of slot s (the type's, with a type filter) into key. */
static void list_index_key(const struct list_ctx *c, unsigned s, char key[HUB_KEY_MAX])
{
	if (c->type)
		hub_key_idx_type(key, HUB_KEY_MAX, s, c->type);
	else
		hub_key_idx_devices(key, HUB_KEY_MAX, s);
}

/* On one Redis the indexes of up to LIST_UNION marked slots are read by one
 * SUNION (what one set gave before layout 3, in a few calls: at most 64),
 * one after the other, so that a request capped at LIST_MAX_IDS reads
 * little more than that (256 slots of a fleet of a million: ~16,000 ids);
 * where calls must keep to one slot (hub_redis_split), one SMEMBERS per
 * slot, LIST_WALK in flight. */
#define LIST_UNION 256

static bool list_walk_union(struct hub_req *rq, struct list_ctx *c)
{
	char (*keys)[HUB_KEY_MAX] = hub_xmalloc(LIST_UNION * sizeof(*keys));
	const char **argv = hub_xmalloc((1 + LIST_UNION) * sizeof(*argv));
	int n = 0;

	argv[0] = "SUNION";
	while (n < LIST_UNION && c->next_slot < HUB_SLOTS) {
		unsigned s = c->next_slot++;
		if (!slot_marked(c, s))
			continue;
		list_index_key(c, s, keys[n]);
		argv[1 + n] = keys[n];
		n++;
	}
	bool ok = !n || !cmd(rq, list_on_members, 1 + n, argv);
	if (ok && n)
		c->inflight++;
	free(argv);
	free(keys);
	return ok;
}

static void list_walk(struct hub_req *rq, struct list_ctx *c)
{
	if (!hub_redis_split(hub_req_hub(rq)->redis)) {
		if (c->inflight < LIST_WALK && c->next_slot < HUB_SLOTS && !c->truncated &&
		    !list_walk_union(rq, c)) {
			list_fail(rq, c, NULL);
			return;
		}
		if (!c->inflight)
			list_sorted(rq, c);
		return;
	}
	while (c->inflight < LIST_WALK && c->next_slot < HUB_SLOTS && !c->truncated) {
		unsigned s = c->next_slot++;
		char key[HUB_KEY_MAX];

		if (!slot_marked(c, s))
			continue;
		if (c->type)
			hub_key_idx_type(key, sizeof(key), s, c->type);
		else
			hub_key_idx_devices(key, sizeof(key), s);
		const char *argv[] = { "SMEMBERS", key };
		if (cmd(rq, list_on_members, 2, argv)) {
			list_fail(rq, c, NULL);
			return;
		}
		c->inflight++;
	}
	if (!c->inflight)
		list_sorted(rq, c);
}

/* One round of the paged walk: the indexes of the next LIST_UNION marked
 * slots in one SUNION on one Redis, of the next LIST_WALK in one SMEMBERS
 * each where calls keep to one slot; list_sorted_paged once all are in. */
static void list_walk_paged(struct hub_req *rq, struct list_ctx *c)
{
	if (!hub_redis_split(hub_req_hub(rq)->redis)) {
		if (!list_walk_union(rq, c)) {
			list_fail(rq, c, NULL);
			return;
		}
	} else {
		for (int n = 0; n < LIST_WALK && c->next_slot < HUB_SLOTS;) {
			unsigned s = c->next_slot++;
			char key[HUB_KEY_MAX];

			if (!slot_marked(c, s))
				continue;
			list_index_key(c, s, key);
			const char *argv[] = { "SMEMBERS", key };
			if (cmd(rq, list_on_members, 2, argv)) {
				list_fail(rq, c, NULL);
				return;
			}
			c->inflight++;
			n++;
		}
	}
	if (!c->inflight)
		list_sorted(rq, c);
}

static void list_on_members(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct list_ctx *c = hub_req_ctx(rq);

	if (hub_req_gone(rq) || c->failed)
		goto out;
	c->inflight--;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		list_fail(rq, c, r);
		goto out;
	}
	for (size_t i = 0; i < r->elements; i++) {
		const redisReply *e = r->element[i];
		if (!c->paged && c->considered == LIST_MAX_IDS) {
			c->truncated = true;
			break;
		}
		if (!c->paged)
			c->considered++;   /* paged: counted in walk order */
		if (e->type != REDIS_REPLY_STRING || !hub_id_valid(e->str, e->len) ||
		    !visible(rq, e->str))
			continue;
		if (c->nids == c->cap_ids) {
			c->cap_ids = c->cap_ids ? 2 * c->cap_ids : 256;
			c->ids = hub_xrealloc(c->ids, c->cap_ids * sizeof(*c->ids));
		}
		c->ids[c->nids++] = hub_xstrdup(e->str);
	}
	if (!c->paged)
		list_walk(rq, c);
	else if (!c->inflight)
		list_sorted(rq, c);
out:
	hub_req_unref(rq);
}

static void list_on_directory(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct list_ctx *c = hub_req_ctx(rq);

	if (hub_req_gone(rq) || c->failed)
		goto out;
	if (!r || (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_NIL)) {
		list_fail(rq, c, r);
		goto out;
	}
	if (r->type == REDIS_REPLY_STRING && r->len) {
		c->slots = hub_xmalloc(r->len);
		memcpy(c->slots, r->str, r->len);
		c->nslots_bytes = r->len;
	}
	if (c->paged) {
		c->next_slot = c->after ? hub_dev_slot(c->after) : 0;
		list_walk_paged(rq, c);
	} else {
		list_walk(rq, c);
	}
out:
	hub_req_unref(rq);
}

static void devices_list(struct hub_req *rq, const struct hub_query *q)
{
	struct list_ctx *c = hub_xcalloc(1, sizeof(*c));
	const char *v;

	hub_req_set_ctx(rq, c, list_free);
	c->online = -1;
	c->limit = LIST_LIMIT_DEFAULT;
	if ((v = hub_query_get(q, "limit")) && hub_parse_ll(v, 1, LIST_LIMIT_MAX, &c->limit)) {
		hub_req_error(rq, 422, "invalid", "limit", "limit must be an integer from 1 to 1000");
		return;
	}
	if ((v = hub_query_get(q, "cursor"))) {
		c->paged = true;
		if (*v && !(c->after = cursor_in(v))) {
			hub_req_error(rq, 422, "invalid", "cursor",
				      "cursor must be empty or a next_cursor this route returned");
			return;
		}
	}
	if ((v = hub_query_get(q, "online"))) {
		if (!strcmp(v, "true")) {
			c->online = 1;
		} else if (!strcmp(v, "false")) {
			c->online = 0;
		} else {
			hub_req_error(rq, 422, "invalid", "online", "online must be true or false");
			return;
		}
	}
	if ((v = hub_query_get(q, "device_type"))) {
		if (!hub_id_valid(v, strlen(v))) {
			hub_req_error(rq, 422, "invalid", "device_type",
				      "device_type must match [A-Za-z0-9._:-]{1,128}");
			return;
		}
		c->type = hub_xstrdup(v);
	}
	for (size_t i = 0; i < q->n; i++) {
		if (strncmp(q->name[i], "label.", 6))
			continue;
		const char *k = q->name[i] + 6;
		if (!*k || strlen(k) > 128) {
			hub_req_error(rq, 422, "invalid", q->name[i],
				      "a label filter is label.<name>=<value> with a name of 1 to 128 bytes");
			return;
		}
		if (c->nlabels == LIST_MAX_LABELS) {
			hub_req_error(rq, 422, "invalid", q->name[i], "at most 16 label filters");
			return;
		}
		c->lk[c->nlabels] = hub_xstrdup(k);
		c->lv[c->nlabels++] = hub_xstrdup(q->value[i]);
	}
	hub_buf_puts(&c->out, "{\"devices\":[");
	const char *argv[] = { "GET", HUB_KEY_SLOTS };
	if (cmd(rq, list_on_directory, 2, argv))
		hub_req_unavailable(rq);
}

/* ---- GET /v1/devices/{device} --------------------------------------------- */

struct one_ctx {
	struct dev_row row;
	bool done, have_row;
	unsigned waiting;          /* replies still to come: HGETALL + one per shard */
	uint64_t best_ms, best_seq; /* the newest last reading so far */
	bool have_best;
	hub_buf best;              /* its JSON */
};

static void one_free(void *p)
{
	struct one_ctx *c = p;

	row_clear(&c->row);
	hub_buf_free(&c->best);
	free(c);
}

/* Answers once the registry row and every shard's last reading are in. */
static void one_finish(struct hub_req *rq, struct one_ctx *c)
{
	hub_buf o = { 0 };

	if (c->done || c->waiting)
		return;
	c->done = true;
	row_json(&o, &c->row);
	o.len--; /* reopen the object */
	hub_buf_puts(&o, ",\"last_reading\":");
	if (c->have_best)
		hub_buf_append(&o, c->best.data, c->best.len);
	else
		hub_buf_puts(&o, "null");
	hub_buf_puts(&o, "}");
	hub_req_respond(rq, 200, "application/json", o.data, o.len);
	hub_buf_free(&o);
}

static void one_on_hgetall(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct one_ctx *c = hub_req_ctx(rq);

	if (hub_req_gone(rq) || c->done)
		goto out;
	c->waiting--;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		c->done = true;
		hub_req_redis_failed(rq, r);
		goto out;
	}
	row_fill(&c->row, r);
	if (!c->row.exists) {
		c->done = true;
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		goto out;
	}
	one_finish(rq, c);
out:
	hub_req_unref(rq);
}

/* XREVRANGE COUNT 1 of one shard's stream of the device. */
static void one_on_last(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct one_ctx *c = hub_req_ctx(rq);
	uint64_t ms, seq;
	hub_buf o = { 0 };

	if (hub_req_gone(rq) || c->done)
		goto out;
	c->waiting--;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		c->done = true;
		hub_req_redis_failed(rq, r);
		goto out;
	}
	if (r->elements) {
		entry_id(r->element[0], &ms, &seq);
		if ((!c->have_best || ms > c->best_ms || (ms == c->best_ms && seq > c->best_seq)) &&
		    entry_out(&o, r->element[0], INT64_MIN, INT64_MAX, false)) {
			c->have_best = true;
			c->best_ms = ms;
			c->best_seq = seq;
			c->best.len = 0;
			hub_buf_append(&c->best, o.data, o.len);
		}
	}
	one_finish(rq, c);
out:
	hub_buf_free(&o);
	hub_req_unref(rq);
}

static void device_one(struct hub_req *rq, const char *device)
{
	struct one_ctx *c = hub_xcalloc(1, sizeof(*c));
	char hkey[HUB_KEY_MAX], skey[HUB_KEY_MAX];
	unsigned shards = hub_ingest_shards(hub_req_hub(rq));

	hub_req_set_ctx(rq, c, one_free);
	if (!shards) {
		hub_req_unavailable(rq);
		return;
	}
	c->row.id = hub_xstrdup(device);
	hub_key_dev(hkey, sizeof(hkey), device);   /* the route checked the id */
	const char *a1[] = { "HGETALL", hkey };
	c->waiting = 1 + shards;
	if (cmd(rq, one_on_hgetall, 2, a1)) {
		c->done = true;
		hub_req_unavailable(rq);
		return;
	}
	/* The device's readings are in the stream of each shard it sent
	 * through (its gateways'): the newest of their last entries. */
	for (unsigned k = 0; k < shards; k++) {
		hub_key_tm_shard(skey, sizeof(skey), k, device);
		const char *a2[] = { "XREVRANGE", skey, "+", "-", "COUNT", "1" };
		if (cmd(rq, one_on_last, 6, a2)) {
			c->done = true;
			hub_req_unavailable(rq);
			return;
		}
	}
}

/* ---- GET /v1/devices/{device}/telemetry ----------------------------------- */

enum tm_format { TM_JSON, TM_NDJSON, TM_CSV };

struct tm_ctx {
	char device[HUB_ID_MAX + 1];
	char key[HUB_KEY_MAX];
	long long from, to, limit; /* limit -1: none */
	enum tm_format fmt;
	char start[48];            /* next XRANGE start: "<ms>" or "(<id>" */
	char end[24];
	long long count;           /* readings emitted */
	char last_pos[48];         /* last emitted */
	bool done;
	bool begun;                /* streams: headers queued */
	unsigned page;             /* XRANGE COUNT of the next page */
	hub_buf out;               /* json: the whole body; streams: one page */
	/* Several ingest shards: the device's stream in each, merged by id. */
	unsigned nsh, waiting;
	struct tm_shard {
		char key[HUB_KEY_MAX];
		char start[48];
		bool more, full;
		uint64_t last_ms, last_seq;
	} *sh;
	struct tm_ent {
		uint64_t ms, seq;
		unsigned shard;
		char *id, *ts, *data;
		size_t data_len;
	} *ents;
	size_t nents, cap_ents;
};

static void tm_ents_clear(struct tm_ctx *c)
{
	for (size_t i = 0; i < c->nents; i++) {
		free(c->ents[i].id);
		free(c->ents[i].ts);
		free(c->ents[i].data);
	}
	c->nents = 0;
}

static void tm_free(void *p)
{
	struct tm_ctx *c = p;

	hub_buf_free(&c->out);
	tm_ents_clear(c);
	free(c->ents);
	free(c->sh);
	free(c);
}

static void tm_on_page(redisReply *r, void *arg);
static void tm_on_shard_page(redisReply *r, void *arg);
static void tm_page_done(struct hub_req *rq, struct tm_ctx *c, size_t page_start, bool limited,
			 bool more);

struct tm_op {
	struct hub_req *rq;
	unsigned shard;
};

/* The next page: one XRANGE (one shard), or one per shard whose stream has
 * more, merged when all answered (tm_merge). */
static int tm_fetch(struct hub_req *rq, struct tm_ctx *c)
{
	char count[16];

	snprintf(count, sizeof(count), "%u", c->page);
	if (c->nsh <= 1) {
		const char *argv[] = { "XRANGE", c->key, c->start, c->end, "COUNT", count };
		return cmd(rq, tm_on_page, 6, argv);
	}
	c->waiting = 0;
	for (unsigned k = 0; k < c->nsh; k++) {
		struct tm_shard *h = &c->sh[k];
		struct tm_op *op;

		h->full = false;
		if (!h->more)
			continue;
		const char *argv[] = { "XRANGE", h->key, h->start, c->end, "COUNT", count };
		op = hub_xmalloc(sizeof(*op));
		op->rq = rq;
		op->shard = k;
		hub_req_ref(rq);
		if (hub_redis_command_argv(hub_req_hub(rq)->redis, tm_on_shard_page, op, 6, argv,
					   NULL)) {
			hub_req_unref(rq);
			free(op);
			c->waiting = 0;
			return -1;
		}
		c->waiting++;
	}
	return 0;
}

static void tm_drained(struct hub_req *rq)
{
	struct tm_ctx *c = hub_req_ctx(rq);

	if (!c->done && tm_fetch(rq, c)) {
		c->done = true;
		hub_req_abort(rq); /* Redis went away mid-stream */
	}
}

static void tm_on_exists(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct tm_ctx *c = hub_req_ctx(rq);

	if (hub_req_gone(rq) || c->done)
		goto out;
	if (!r || r->type != REDIS_REPLY_INTEGER) {
		c->done = true;
		hub_req_redis_failed(rq, r);
	} else if (!r->integer) {
		c->done = true;
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
	}
out:
	hub_req_unref(rq);
}

static void tm_on_page(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct tm_ctx *c = hub_req_ctx(rq);
	bool streaming = c->fmt != TM_JSON;

	if (hub_req_gone(rq) || c->done)
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		c->done = true;
		if (c->begun) /* headers are out */
			hub_req_abort(rq);
		else
			hub_req_redis_failed(rq, r);
		goto out;
	}
	if (streaming && !c->begun) { /* the first page */
		c->begun = true;
		hub_req_stream_begin(rq, 200, c->fmt == TM_CSV ? "text/csv; charset=utf-8"
							       : "application/x-ndjson",
				     tm_drained);
		if (c->fmt == TM_CSV)
			hub_buf_puts(&c->out, "ts,pos,data\r\n");
	}
	bool limited = false;
	size_t page_start = c->out.len;
	for (size_t i = 0; i < r->elements; i++) {
		if ((c->limit >= 0 && c->count == c->limit) ||
		    (!streaming && c->out.len > TM_JSON_MAX_BYTES)) {
			limited = true;
			break;
		}
		size_t mark = c->out.len;
		if (c->fmt == TM_JSON && c->count)
			hub_buf_puts(&c->out, ",");
		if (!entry_out(&c->out, r->element[i], c->from, c->to, c->fmt == TM_CSV)) {
			c->out.len = mark;
			continue;
		}
		if (c->fmt == TM_NDJSON)
			hub_buf_puts(&c->out, "\n");
		c->count++;
		snprintf(c->last_pos, sizeof(c->last_pos), "%s", r->element[i]->element[0]->str);
	}
	const redisReply *last = r->elements ? r->element[r->elements - 1] : NULL;
	bool more = !limited && r->elements == c->page && last &&
		    last->type == REDIS_REPLY_ARRAY && last->elements == 2 &&
		    last->element[0]->type == REDIS_REPLY_STRING;
	if (more)
		snprintf(c->start, sizeof(c->start), "(%s", last->element[0]->str);
	tm_page_done(rq, c, page_start, limited, more);
out:
	hub_req_unref(rq);
}

/* After a page's readings were written to c->out: the next page, or the
 * end of the answer. */
static void tm_page_done(struct hub_req *rq, struct tm_ctx *c, size_t page_start, bool limited,
			 bool more)
{
	bool streaming = c->fmt != TM_JSON;

	/* Readings can be large (up to max-frame-bytes): keep one page's output
	 * near TM_PAGE_BYTES by adapting COUNT. */
	if (c->out.len - page_start > TM_PAGE_BYTES && c->page > TM_PAGE_MIN)
		c->page /= 2;
	else if (c->out.len - page_start < TM_PAGE_BYTES / 4 && c->page < TM_PAGE)
		c->page = c->page * 2 > TM_PAGE ? TM_PAGE : c->page * 2;

	if (!streaming) {
		if (more) {
			if (tm_fetch(rq, c)) {
				c->done = true;
				hub_req_unavailable(rq);
			}
			return;
		}
		c->done = true;
		hub_buf_puts(&c->out, "],\"next\":");
		if (limited && c->count)
			hub_buf_json_str(&c->out, c->last_pos, strlen(c->last_pos));
		else
			hub_buf_puts(&c->out, "null");
		hub_buf_puts(&c->out, "}");
		hub_req_respond(rq, 200, "application/json", c->out.data, c->out.len);
		hub_buf_free(&c->out); /* copied: do not hold a large body twice */
		return;
	}
	hub_req_stream_write(rq, c->out.data, c->out.len);
	c->out.len = 0;
	if (!more) {
		c->done = true;
		hub_req_stream_end(rq);
	}
	/* else: the next page is fetched when this one is written (tm_drained) */
}

static int cmp_ent(const void *a, const void *b)
{
	const struct tm_ent *x = a, *y = b;

	if (x->ms != y->ms)
		return x->ms < y->ms ? -1 : 1;
	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Every shard answered its page: the entries up to the smallest last id of
 * a full page (beyond it a shard may still hold earlier entries) go out in
 * id order; each shard with more resumes after that id. */
static void tm_merge(struct hub_req *rq, struct tm_ctx *c)
{
	bool streaming = c->fmt != TM_JSON, limited = false, more = false;
	uint64_t bms = UINT64_MAX, bseq = UINT64_MAX;
	size_t page_start, i;

	if (streaming && !c->begun) {
		c->begun = true;
		hub_req_stream_begin(rq, 200, c->fmt == TM_CSV ? "text/csv; charset=utf-8"
							       : "application/x-ndjson",
				     tm_drained);
		if (c->fmt == TM_CSV)
			hub_buf_puts(&c->out, "ts,pos,data\r\n");
	}
	for (unsigned k = 0; k < c->nsh; k++) {
		struct tm_shard *h = &c->sh[k];
		if (!h->more || !h->full)
			continue;
		if (h->last_ms < bms || (h->last_ms == bms && h->last_seq < bseq)) {
			bms = h->last_ms;
			bseq = h->last_seq;
		}
	}
	/* a shard has more when its page was full or entries of it beyond
	 * the bound are left (below); each resumes after the bound */
	for (unsigned k = 0; k < c->nsh; k++) {
		c->sh[k].more = c->sh[k].more && c->sh[k].full;
		more |= c->sh[k].more;
	}
	if (c->nents)
		qsort(c->ents, c->nents, sizeof(*c->ents), cmp_ent);
	page_start = c->out.len;
	for (i = 0; i < c->nents; i++) {
		struct tm_ent *e = &c->ents[i];
		if (e->ms > bms || (e->ms == bms && e->seq > bseq)) {
			for (size_t j = i; j < c->nents; j++)
				c->sh[c->ents[j].shard].more = true;
			more = true;
			break;
		}
		/* Stop at the limit, but never between entries of one id (two
		 * shards' Redis may give the same id): `after` skips the id. */
		if (((c->limit >= 0 && c->count >= c->limit) ||
		     (!streaming && c->out.len > TM_JSON_MAX_BYTES)) &&
		    !(c->count && !strcmp(c->last_pos, e->id))) {
			limited = true;
			break;
		}
		size_t mark = c->out.len;
		if (c->fmt == TM_JSON && c->count)
			hub_buf_puts(&c->out, ",");
		if (!entry_out_fields(&c->out, e->id, e->ts, e->data, e->data_len, c->from, c->to,
				      c->fmt == TM_CSV)) {
			c->out.len = mark;
			continue;
		}
		if (c->fmt == TM_NDJSON)
			hub_buf_puts(&c->out, "\n");
		c->count++;
		snprintf(c->last_pos, sizeof(c->last_pos), "%s", e->id);
	}
	tm_ents_clear(c);
	if (limited)
		more = false;
	if (more)
		for (unsigned k = 0; k < c->nsh; k++)
			if (c->sh[k].more)
				snprintf(c->sh[k].start, sizeof(c->sh[k].start),
					 "(%" PRIu64 "-%" PRIu64, bms, bseq);
	tm_page_done(rq, c, page_start, limited, more);
}

static void tm_on_shard_page(redisReply *r, void *arg)
{
	struct tm_op *op = arg;
	struct hub_req *rq = op->rq;
	struct tm_ctx *c = hub_req_ctx(rq);
	struct tm_shard *h = &c->sh[op->shard];

	free(op);
	if (hub_req_gone(rq) || c->done)
		goto out;
	c->waiting--;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		c->done = true;
		tm_ents_clear(c);
		if (c->begun)
			hub_req_abort(rq);
		else
			hub_req_redis_failed(rq, r);
		goto out;
	}
	for (size_t i = 0; i < r->elements; i++) {
		const redisReply *e = r->element[i], *ts, *data;
		struct tm_ent *t;
		uint64_t ms, seq;

		entry_id(e, &ms, &seq);
		if (!ms && !seq)
			continue;
		h->last_ms = ms;
		h->last_seq = seq;
		ts = field(e->element[1], "ts");
		data = field(e->element[1], "data");
		if (c->nents == c->cap_ents) {
			c->cap_ents = c->cap_ents ? c->cap_ents * 2 : 64;
			c->ents = hub_xrealloc(c->ents, c->cap_ents * sizeof(*c->ents));
		}
		t = &c->ents[c->nents++];
		t->ms = ms;
		t->seq = seq;
		t->shard = (unsigned)(h - c->sh);
		t->id = hub_xstrdup(e->element[0]->str);
		t->ts = ts ? hub_xstrdup(ts->str) : NULL;
		t->data = data ? hub_xmalloc(data->len + 1) : NULL;
		t->data_len = data ? data->len : 0;
		if (data)
			memcpy(t->data, data->str, data->len + 1);
	}
	h->full = r->elements == c->page;
	if (!c->waiting)
		tm_merge(rq, c);
out:
	hub_req_unref(rq);
}

static void telemetry(struct hub_req *rq, const char *device, const struct hub_query *q)
{
	struct tm_ctx *c = hub_xcalloc(1, sizeof(*c));
	const char *v, *after;

	hub_req_set_ctx(rq, c, tm_free);
	snprintf(c->device, sizeof(c->device), "%s", device);
	if (!(c->nsh = hub_ingest_shards(hub_req_hub(rq)))) {
		hub_req_unavailable(rq);
		return;
	}
	hub_key_tm_shard(c->key, sizeof(c->key), 0, device);   /* the route checked the id */
	c->fmt = TM_JSON;
	c->page = TM_PAGE;
	if ((v = hub_query_get(q, "format"))) {
		if (!strcmp(v, "json")) {
			c->fmt = TM_JSON;
		} else if (!strcmp(v, "ndjson")) {
			c->fmt = TM_NDJSON;
		} else if (!strcmp(v, "csv")) {
			c->fmt = TM_CSV;
		} else {
			hub_req_error(rq, 422, "invalid", "format", "format must be json, ndjson or csv");
			return;
		}
	}
	if (!(v = hub_query_get(q, "from"))) {
		hub_req_error(rq, 422, "invalid", "from", "from (ms since the epoch) is required");
		return;
	}
	if (hub_parse_ll(v, 0, INT64_MAX / 2, &c->from)) {
		hub_req_error(rq, 422, "invalid", "from", "from must be an integer (ms since the epoch)");
		return;
	}
	if (!(v = hub_query_get(q, "to"))) {
		hub_req_error(rq, 422, "invalid", "to", "to (ms since the epoch) is required");
		return;
	}
	if (hub_parse_ll(v, 0, INT64_MAX / 2, &c->to)) {
		hub_req_error(rq, 422, "invalid", "to", "to must be an integer (ms since the epoch)");
		return;
	}
	if (c->to < c->from) {
		hub_req_error(rq, 422, "invalid", "to", "to must not be before from");
		return;
	}
	int64_t max_range_ms = (int64_t)hub_req_hub(rq)->cfg.history_max_range_s * 1000;
	if (c->to - c->from > max_range_ms) {
		char msg[96];
		snprintf(msg, sizeof(msg), "to - from must be at most %lld ms (history-max-range-s)",
			 (long long)max_range_ms);
		hub_req_error(rq, 422, "invalid", "to", msg);
		return;
	}
	c->limit = c->fmt == TM_JSON ? TM_JSON_LIMIT_DEFAULT : -1;
	if ((v = hub_query_get(q, "limit")) &&
	    hub_parse_ll(v, 1, c->fmt == TM_JSON ? TM_JSON_LIMIT_MAX : INT64_MAX / 2, &c->limit)) {
		hub_req_error(rq, 422, "invalid", "limit",
			      c->fmt == TM_JSON ? "limit must be an integer from 1 to 100000"
						: "limit must be a positive integer");
		return;
	}
	uint64_t ams = 0, aseq = 0;
	if ((after = hub_query_get(q, "after")) &&
	    hub_parse_pos(after, strlen(after), true, &ams, &aseq)) {
		hub_req_error(rq, 422, "invalid", "after",
			      "after must be a position (\"<ms>-<n>\") from a previous answer's next");
		return;
	}
	long long lo = c->from > TM_SKEW_MS ? c->from - TM_SKEW_MS : 0;
	long long hi = c->to + TM_SKEW_MS;
	snprintf(c->start, sizeof(c->start), "%lld", lo);
	if (after && ams > (uint64_t)hi) {
		/* Nothing of the range comes after it: an empty scan (Redis
		 * refuses an exclusive start at the largest id). */
		snprintf(c->start, sizeof(c->start), "%lld", hi + 1);
	} else if (after && ams >= (uint64_t)lo) {
		/* Resume after `after`, but never before the scan's own start. */
		snprintf(c->start, sizeof(c->start), "(%" PRIu64 "-%" PRIu64, ams, aseq);
	}
	snprintf(c->end, sizeof(c->end), "%lld", hi);
	if (c->nsh > 1) {
		c->sh = hub_xcalloc(c->nsh, sizeof(*c->sh));
		for (unsigned k = 0; k < c->nsh; k++) {
			hub_key_tm_shard(c->sh[k].key, sizeof(c->sh[k].key), k, device);
			memcpy(c->sh[k].start, c->start, sizeof(c->start));
			c->sh[k].more = true;
		}
	}
	if (c->fmt == TM_JSON) {
		hub_buf_puts(&c->out, "{\"device\":");
		hub_buf_json_str(&c->out, device, strlen(device));
		hub_buf_puts(&c->out, ",\"readings\":[");
	}
	char hkey[HUB_KEY_MAX];
	hub_key_dev(hkey, sizeof(hkey), device);
	const char *argv[] = { "EXISTS", hkey };
	if (cmd(rq, tm_on_exists, 2, argv)) {
		hub_req_unavailable(rq);
		return;
	}
	if (tm_fetch(rq, c)) {
		c->done = true;
		hub_req_unavailable(rq);
	}
}

/* ---- routes ---------------------------------------------------------------- */

/* The device named by the route's {} segment, or a 404 answered: an invalid
 * id and a device outside the key's patterns are answered exactly like one
 * that does not exist (the key learns nothing about it). */
static const char *route_device(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *id = a->param[0];

	if (!hub_id_valid(id, strlen(id)) || !visible(rq, id)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		return NULL;
	}
	return id;
}

static void on_list(struct hub_req *rq, const struct hub_route_args *a)
{
	devices_list(rq, a->query);
}

static void on_one(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *device = route_device(rq, a);

	if (device)
		device_one(rq, device);
}

static void on_telemetry(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *device = route_device(rq, a);

	if (device)
		telemetry(rq, device, a->query);
}

/* GET /v1/whoami: what the calling key may do (docs/admin-api.md "Who am
 * I"): its name, scopes, device patterns and analytics tier; never the key. */
static void on_whoami(struct hub_req *rq, const struct hub_route_args *a)
{
	const auth_principal *p = hub_req_who(rq);
	const struct hub *hub = hub_req_hub(rq);
	static const struct { unsigned bit; const char *name; } scopes[] = {
		{ AUTH_SCOPE_TELEMETRY_READ, "telemetry:read" },
		{ AUTH_SCOPE_COMMANDS_WRITE, "commands:write" },
		{ AUTH_SCOPE_ADMIN, "admin" },
	};
	hub_buf o = { 0 };
	bool first = true;

	(void)a;
	hub_buf_puts(&o, "{\"name\":");
	hub_buf_json_str(&o, p->name, strlen(p->name));
	hub_buf_puts(&o, ",\"kind\":");
	hub_buf_puts(&o, p->is_api_key ? "\"api_key\"" : "\"token\"");
	hub_buf_puts(&o, ",\"scopes\":[");
	for (size_t i = 0; i < sizeof(scopes) / sizeof(scopes[0]); i++) {
		if (!(p->scopes & scopes[i].bit))
			continue;
		hub_buf_printf(&o, "%s\"%s\"", first ? "" : ",", scopes[i].name);
		first = false;
	}
	/* what the scopes allow, admin implying every one */
	hub_buf_printf(&o, "],\"can\":{\"read\":%s,\"commands\":%s,\"admin\":%s}",
		       auth_has_scope(p, AUTH_SCOPE_TELEMETRY_READ) ? "true" : "false",
		       auth_has_scope(p, AUTH_SCOPE_COMMANDS_WRITE) ? "true" : "false",
		       auth_has_scope(p, AUTH_SCOPE_ADMIN) ? "true" : "false");
	hub_buf_puts(&o, ",\"devices\":");
	if (p->devices.all) {
		hub_buf_puts(&o, "[\"*\"]");
	} else {
		hub_buf_puts(&o, "[");
		for (size_t i = 0; i < p->devices.n; i++) {
			if (i)
				hub_buf_puts(&o, ",");
			hub_buf_json_str(&o, p->devices.items[i], strlen(p->devices.items[i]));
		}
		hub_buf_puts(&o, "]");
	}
	const char *tier = *p->tier ? p->tier : hub->cfg.api_default_tier;
	hub_buf_puts(&o, ",\"tier\":");
	if (tier)
		hub_buf_json_str(&o, tier, strlen(tier));
	else
		hub_buf_puts(&o, "null");
	hub_buf_printf(&o, ",\"tier_default\":%s}", *p->tier ? "false" : "true");
	hub_req_respond(rq, 200, "application/json", o.data, o.len);
	hub_buf_free(&o);
}

static const struct hub_route routes[] = {
	{ "GET", "/v1/whoami", HUB_ROUTE_KEY, 0, on_whoami },
	{ "GET", "/v1/devices", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ, on_list },
	{ "GET", "/v1/devices/{}", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ, on_one },
	{ "GET", "/v1/devices/{}/telemetry", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ, on_telemetry },
};

static int api_start(struct hub *hub, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	hub_http_add_routes(hub, routes, sizeof(routes) / sizeof(routes[0]), NULL);
	return 0;
}

const struct hub_module hub_api_module = {
	.name = "api",
	.start = api_start,
};
