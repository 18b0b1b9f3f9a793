/*
 * registry.c - what the hub writes to Redis for gateways: the device
 * registry (connect, announce, seen, offline, the limits kept between
 * connections) and the telemetry store, each one call of a script of
 * hub/lua/ (each file's top comment is its contract). Every key a script
 * touches is built here, through hub/keys.h, and passed in its KEYS.
 *
 * Every call is formatted into one reused RESP buffer (the loop is
 * single-threaded) and queued as is: hiredis's argv formatting costs an
 * allocation and a printf-style pass per argument, about an eighth of the
 * hub's instructions per frame. The telemetry store is hub/ingest.c.
 */
#include "hub/registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>

#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/slot.h"
#include "hub/util.h"
#include "hub_lua.h"

#define RESP_KEEP_MAX   (256 * 1024)  /* a larger command's buffer is not kept */

struct hub_registry {
	struct hub *hub;
	int script_announce, script_detach, script_offline, script_seen,
	    script_connect, script_limits, script_epoch_floor, script_slots_mark;
	char run_id[HUB_KEY_MAX];  /* "<instance>:<run token>" */
	hub_buf resp;              /* the command being built */
	unsigned char slots[HUB_SLOTS / 8]; /* slots marked in HUB_KEY_SLOTS and the
					     * run's bitmap by this process */
	/* Admission of the connect-storm calls (registry.h). */
	lws_dll2_owner_t fifo;     /* the calls waiting (count: how many) */
	size_t inflight;
	bool pumping;
};

/* Starts EVALSHA <script> <nkeys> followed by nargs more arguments. */
static void resp_eval(struct hub_registry *reg, int script, size_t nkeys, size_t nargs)
{
	reg->resp.len = 0;
	hub_resp_head(&reg->resp, 3 + nargs);
	hub_resp_evalsha(&reg->resp, reg->hub->redis, script, nkeys);
}

static void resp_arg(struct hub_registry *reg, const char *p, size_t n)
{
	hub_resp_arg(&reg->resp, p, n);
}

static void resp_str(struct hub_registry *reg, const char *s)
{
	hub_resp_str(&reg->resp, s);
}

static void resp_int(struct hub_registry *reg, int64_t v)
{
	hub_resp_int(&reg->resp, v);
}

/* A key built by a hub/keys.h builder (0: the name was invalid: "" goes,
 * which the script's command refuses or finds empty). */
static void resp_key(struct hub_registry *reg, const char *key, size_t len)
{
	resp_arg(reg, key, len);
}

static int resp_send_as(struct hub_registry *reg, hub_redis_cb cb, void *arg, bool durable)
{
	int rc = (durable ? hub_redis_command_durable : hub_redis_command_formatted)
		 (reg->hub->redis, cb, arg, reg->resp.data, reg->resp.len);

	if (reg->resp.cap > RESP_KEEP_MAX)
		hub_buf_free(&reg->resp);
	return rc;
}

static int resp_send(struct hub_registry *reg, hub_redis_cb cb, void *arg)
{
	return resp_send_as(reg, cb, arg, false);
}

/* One seen call over items idx[0..n) (indexes into items). */
static int seen_call(struct hub_registry *reg, int64_t now_ms, const struct hub_seen_item *items,
		     const size_t *idx, size_t n, hub_redis_cb cb, void *arg)
{
	char key[HUB_KEY_MAX];

	resp_eval(reg, reg->script_seen, n, n + 1 + 2 * n);
	for (size_t i = 0; i < n; i++)
		resp_key(reg, key, hub_key_dev(key, sizeof(key), items[idx ? idx[i] : i].device));
	resp_int(reg, now_ms);
	for (size_t i = 0; i < n; i++) {
		resp_str(reg, items[idx ? idx[i] : i].conn);
		resp_int(reg, items[idx ? idx[i] : i].tat_ms);
	}
	return resp_send(reg, cb, arg);
}

/* seen split per slot (hub_redis_split): the calls' replies (indexes of
 * lost devices in each call) are gathered, as indexes into the caller's
 * items, into one reply for the caller's callback. */
struct seen_gather {
	hub_redis_cb cb;
	void *arg;
	size_t pending;
	bool answered;             /* at least one call answered */
	size_t nlost;
	size_t *lost;              /* n entries at most */
};

struct seen_part {
	struct seen_gather *g;
	size_t n;
	size_t idx[];              /* the caller's index of each device of the call */
};

static void seen_finish(struct seen_gather *g);

static void on_seen_part(redisReply *r, void *arg)
{
	struct seen_part *p = arg;
	struct seen_gather *g = p->g;

	if (r && r->type == REDIS_REPLY_ARRAY) {
		g->answered = true;
		for (size_t i = 0; i < r->elements; i++) {
			const redisReply *x = r->element[i];
			if (x->type == REDIS_REPLY_INTEGER && x->integer >= 0 && (size_t)x->integer < p->n)
				g->lost[g->nlost++] = p->idx[x->integer];
		}
	}
	free(p);
	if (!--g->pending)
		seen_finish(g);
}

static void seen_finish(struct seen_gather *g)
{
	if (g->answered) {
		redisReply *el = hub_xcalloc(g->nlost ? g->nlost : 1, sizeof(*el));
		redisReply **els = hub_xcalloc(g->nlost ? g->nlost : 1, sizeof(*els));
		redisReply arr = { .type = REDIS_REPLY_ARRAY, .elements = g->nlost, .element = els };

		for (size_t i = 0; i < g->nlost; i++) {
			el[i].type = REDIS_REPLY_INTEGER;
			el[i].integer = (long long)g->lost[i];
			els[i] = &el[i];
		}
		g->cb(&arr, g->arg);
		free(els);
		free(el);
	} else {
		g->cb(NULL, g->arg);
	}
	free(g->lost);
	free(g);
}

/* (slot << 32 | index) of each item, sorted: the items grouped by slot. */
static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

int hub_registry_seen(struct hub *hub, int64_t now_ms, const struct hub_seen_item *items,
		      size_t n, hub_redis_cb cb, void *arg)
{
	struct hub_registry *reg = hub->registry;

	if (!hub_redis_split(hub->redis) || n < 2)
		return seen_call(reg, now_ms, items, NULL, n, cb, arg);

	/* One call per slot, the devices grouped by their slot. */
	uint64_t *key = hub_xmalloc(n * sizeof(*key));
	size_t *order = hub_xmalloc(n * sizeof(*order));
	struct seen_gather *g = hub_xcalloc(1, sizeof(*g));
	size_t sent = 0;

	for (size_t i = 0; i < n; i++)
		key[i] = (uint64_t)hub_dev_slot(items[i].device) << 32 | i;
	qsort(key, n, sizeof(*key), cmp_u64);
	for (size_t i = 0; i < n; i++)
		order[i] = (size_t)(key[i] & 0xffffffffu);
	free(key);
	g->cb = cb;
	g->arg = arg;
	g->lost = hub_xmalloc(n * sizeof(*g->lost));
	g->pending = 1; /* held until every call is sent */
	for (size_t at = 0, end; at < n; at = end) {
		unsigned slot = hub_dev_slot(items[order[at]].device);
		for (end = at + 1; end < n && hub_dev_slot(items[order[end]].device) == slot; end++)
			;
		struct seen_part *p = hub_xmalloc(sizeof(*p) + (end - at) * sizeof(p->idx[0]));
		p->g = g;
		p->n = end - at;
		memcpy(p->idx, order + at, p->n * sizeof(p->idx[0]));
		g->pending++;
		if (seen_call(reg, now_ms, items, p->idx, p->n, on_seen_part, p)) {
			g->pending--;
			free(p);
			continue;
		}
		sent++;
	}
	free(order);
	if (!sent) {
		free(g->lost);
		free(g);
		return -1; /* nothing sent: the caller's callback is not called */
	}
	/* Release the hold: the last reply ends it (or this, had they all come). */
	if (!--g->pending)
		seen_finish(g);
	return 0;
}

static int connect_send(struct hub_registry *reg, const char *gateway, double rate, double burst,
			hub_redis_cb cb, void *arg)
{
	char num[32], key[HUB_KEY_MAX];
	int n;

	resp_eval(reg, reg->script_connect, 2, 2 + 3);
	resp_key(reg, key, hub_key_gw_epoch(key, sizeof(key), gateway));
	resp_key(reg, key, hub_key_gw_limits(key, sizeof(key), gateway));
	resp_int(reg, hub_now_ms());
	n = snprintf(num, sizeof(num), "%.17g", rate);
	resp_arg(reg, num, (size_t)n);
	n = snprintf(num, sizeof(num), "%.17g", burst);
	resp_arg(reg, num, (size_t)n);
	return resp_send(reg, cb, arg);
}

static int limits_send(struct hub_registry *reg, const char *gateway, int64_t telemetry_tat,
		       int64_t announce_tat, int64_t ack_tat, hub_redis_cb cb, void *arg)
{
	char key[HUB_KEY_MAX];

	resp_eval(reg, reg->script_limits, 1, 1 + 4);
	resp_key(reg, key, hub_key_gw_limits(key, sizeof(key), gateway));
	resp_int(reg, hub_now_ms());
	resp_int(reg, telemetry_tat);
	resp_int(reg, announce_tat);
	resp_int(reg, ack_tat);
	return resp_send(reg, cb, arg);
}

/* ---- announce and the sets devices leave -------------------------------- */

/* The caller's devices grouped by slot: order[] holds the indexes of the
 * devices sorted by (slot, index), so each slot's devices are a run of it
 * in their caller's order. dev(items, i) names device i. */
static size_t *slot_order(const void *items, size_t n, const char *(*dev)(const void *, size_t))
{
	uint64_t *key = hub_xmalloc((n ? n : 1) * sizeof(*key));
	size_t *order = hub_xmalloc((n ? n : 1) * sizeof(*order));

	for (size_t i = 0; i < n; i++)
		key[i] = (uint64_t)hub_dev_slot(dev(items, i)) << 32 | i;
	qsort(key, n, sizeof(*key), cmp_u64);
	for (size_t i = 0; i < n; i++)
		order[i] = (size_t)(key[i] & 0xffffffffu);
	free(key);
	return order;
}

/* The end of the slot group that starts at order[at]. */
static size_t slot_group_end(const void *items, const size_t *order, size_t at, size_t n,
			     const char *(*dev)(const void *, size_t))
{
	unsigned slot = hub_dev_slot(dev(items, order[at]));
	size_t end = at + 1;

	while (end < n && hub_dev_slot(dev(items, order[end])) == slot)
		end++;
	return end;
}

/* moved: announce's (device, old type, old connection) triples: each device
 * leaves its old type's set and its old connection's run's set of its slot
 * (the detach script checks that it did not go back meanwhile). One call:
 * every key is in its device's slot, so a reply of a call that kept to one
 * slot gives a call that does. Fire and forget. */
static void detach(struct hub_registry *reg, const redisReply *moved)
{
	char key[HUB_KEY_MAX], run[HUB_KEY_MAX];
	size_t pairs = 0;

	for (size_t i = 0; i + 2 < moved->elements; i += 3) {
		const redisReply *t = moved->element[i + 1], *c = moved->element[i + 2];
		if (moved->element[i]->type != REDIS_REPLY_STRING)
			continue;
		pairs += t->type == REDIS_REPLY_STRING && t->len;
		pairs += c->type == REDIS_REPLY_STRING && hub_run_of_conn(run, sizeof(run), c->str);
	}
	if (!pairs)
		return;
	resp_eval(reg, reg->script_detach, 2 * pairs, 2 * pairs + 3 * pairs);
	for (size_t i = 0; i + 2 < moved->elements; i += 3) {
		const redisReply *d = moved->element[i], *t = moved->element[i + 1],
				 *c = moved->element[i + 2];
		if (d->type != REDIS_REPLY_STRING)
			continue;
		if (t->type == REDIS_REPLY_STRING && t->len) {
			resp_key(reg, key, hub_key_dev(key, sizeof(key), d->str));
			resp_key(reg, key, hub_key_idx_type(key, sizeof(key), hub_dev_slot(d->str),
							    t->str));
		}
		if (c->type == REDIS_REPLY_STRING && hub_run_of_conn(run, sizeof(run), c->str)) {
			resp_key(reg, key, hub_key_dev(key, sizeof(key), d->str));
			resp_key(reg, key, hub_key_idx_run(key, sizeof(key), hub_dev_slot(d->str), run));
		}
	}
	for (size_t i = 0; i + 2 < moved->elements; i += 3) {
		const redisReply *d = moved->element[i], *t = moved->element[i + 1],
				 *c = moved->element[i + 2];
		if (d->type != REDIS_REPLY_STRING)
			continue;
		if (t->type == REDIS_REPLY_STRING && t->len) {
			resp_arg(reg, d->str, d->len);
			resp_arg(reg, "type", 4);
			resp_arg(reg, t->str, t->len);
		}
		if (c->type == REDIS_REPLY_STRING && hub_run_of_conn(run, sizeof(run), c->str)) {
			resp_arg(reg, d->str, d->len);
			resp_arg(reg, "run", 3);
			resp_str(reg, run);
		}
	}
	resp_send(reg, NULL, NULL);
}

/* The slot directory (HUB_KEY_SLOTS) and the run's slot bitmap
 * (hub_key_runslots): every slot a device is announced into has its bit
 * set in both before the announce writes there (slots_mark.lua), so that a
 * walk over the slot-local indexes (the device list, the sweep of command
 * timers) visits it, and so does whoever reaps or releases the run. Once
 * per slot per process (reg->slots). On one Redis the mark goes in the
 * same pipeline, before the announce (order is kept); on a cluster the
 * announce waits for its reply (two primaries keep no order between
 * them). */
static bool slot_marked(const struct hub_registry *reg, unsigned slot)
{
	return reg->slots[slot / 8] & (1u << (slot % 8));
}

static void slots_set(struct hub_registry *reg, const unsigned *slots, size_t n)
{
	for (size_t i = 0; i < n; i++)
		reg->slots[slots[i] / 8] |= (unsigned char)(1u << (slots[i] % 8));
}

/* slots_mark for n slots; cb as hub_redis_command_formatted. */
static int mark_slots(struct hub_registry *reg, const unsigned *slots, size_t n,
		      hub_redis_cb cb, void *arg)
{
	char key[HUB_KEY_MAX];

	resp_eval(reg, reg->script_slots_mark, 2, 2 + n);
	resp_arg(reg, HUB_KEY_SLOTS, sizeof(HUB_KEY_SLOTS) - 1);
	resp_key(reg, key, hub_key_runslots(key, sizeof(key), reg->run_id));
	for (size_t i = 0; i < n; i++)
		resp_int(reg, slots[i]);
	return resp_send(reg, cb, arg);
}

/* The slots of devices not marked yet by this process (each once), into
 * out (n entries at most); their count. */
static size_t new_slots(struct hub_registry *reg, const void *items, size_t n,
			const char *(*dev)(const void *, size_t), unsigned *out)
{
	size_t k = 0;

	for (size_t i = 0; i < n; i++) {
		unsigned slot = hub_dev_slot(dev(items, i));
		bool dup = slot_marked(reg, slot);
		for (size_t j = 0; !dup && j < k; j++)
			dup = out[j] == slot;
		if (!dup)
			out[k++] = slot;
	}
	return k;
}

void hub_registry_forget_slots(struct hub *hub)
{
	if (hub->registry)
		memset(hub->registry->slots, 0, sizeof(hub->registry->slots));
}

static const char *announce_dev(const void *items, size_t i)
{
	return ((const struct hub_announce_item *)items)[i].device;
}

/* One announce call over items idx[0..n) (NULL: all n), into reg->resp. */
static void announce_build(struct hub_registry *reg, const char *mode, const char *gateway,
			   const char *conn, const char *run,
			   const struct hub_announce_item *items, const size_t *idx, size_t n)
{
	char key[HUB_KEY_MAX];

	resp_eval(reg, reg->script_announce, 4 * n, 4 * n + 8 + 3 * n);
	for (size_t j = 0; j < n; j++) {
		const struct hub_announce_item *it = &items[idx ? idx[j] : j];
		unsigned slot = hub_dev_slot(it->device);
		resp_key(reg, key, hub_key_dev(key, sizeof(key), it->device));
		resp_key(reg, key, hub_key_idx_type(key, sizeof(key), slot, it->type));
		resp_key(reg, key, hub_key_idx_devices(key, sizeof(key), slot));
		resp_key(reg, key, hub_key_idx_run(key, sizeof(key), slot, run));
	}
	resp_str(reg, gateway);
	resp_str(reg, conn);
	resp_str(reg, run);
	resp_str(reg, reg->hub->instance_id);
	resp_int(reg, hub_now_ms());
	resp_str(reg, mode);
	resp_arg(reg, HUB_CH_PRESENCE, sizeof(HUB_CH_PRESENCE) - 1);
	resp_arg(reg, HUB_CH_DEVTAKE, sizeof(HUB_CH_DEVTAKE) - 1);
	for (size_t j = 0; j < n; j++) {
		const struct hub_announce_item *it = &items[idx ? idx[j] : j];
		resp_str(reg, it->device);
		resp_str(reg, it->type);
		resp_arg(reg, it->labels, it->labels_len);
	}
}

struct announce_call {
	struct hub_registry *reg;
	hub_redis_cb cb;
	void *arg;
};

/* announce's reply is {tats, moved}: the devices leave the sets named in
 * moved, and the caller gets tats. */
static void on_announce(redisReply *reply, void *arg)
{
	struct announce_call *ac = arg;
	redisReply *tats = reply;

	if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
	    reply->element[0]->type == REDIS_REPLY_ARRAY) {
		tats = reply->element[0];
		if (reply->element[1]->type == REDIS_REPLY_ARRAY && hub_redis_up(ac->reg->hub->redis))
			detach(ac->reg, reply->element[1]);
	} else if (reply && reply->type != REDIS_REPLY_ERROR) {
		hub_err("registry: announce answered an unexpected reply (type %d)", reply->type);
	}
	if (ac->cb)
		ac->cb(tats, ac->arg);
	free(ac);
}

/* announce split per slot (hub_redis_split): the calls are built at once
 * and sent once the run's new slots are marked; their tats are gathered,
 * in the caller's order, into one reply. A call that fails fails the whole
 * announce for the caller (the gateway announces again; what the other
 * calls wrote is what that announce writes again). */
struct announce_gather {
	struct hub_registry *reg;
	hub_redis_cb cb;
	void *arg;
	size_t n, pending, nparts;
	bool failed;
	unsigned *slots;           /* the slots being marked, nslots */
	size_t nslots;
	char **tats;               /* per caller's item */
	struct announce_part **parts;
};

struct announce_part {
	struct announce_gather *g;
	hub_buf cmd;               /* the call, until sent */
	size_t n;
	size_t idx[];
};

static void announce_finish(struct announce_gather *g)
{
	if (!g->failed) {
		redisReply *el = hub_xcalloc(g->n ? g->n : 1, sizeof(*el));
		redisReply **els = hub_xcalloc(g->n ? g->n : 1, sizeof(*els));
		redisReply arr = { .type = REDIS_REPLY_ARRAY, .elements = g->n, .element = els };

		for (size_t i = 0; i < g->n; i++) {
			el[i].type = REDIS_REPLY_STRING;
			el[i].str = g->tats[i] ? g->tats[i] : "0";
			el[i].len = strlen(el[i].str);
			els[i] = &el[i];
		}
		if (g->cb)
			g->cb(&arr, g->arg);
		free(els);
		free(el);
	} else if (g->cb) {
		g->cb(NULL, g->arg);
	}
	for (size_t i = 0; i < g->n; i++)
		free(g->tats[i]);
	free(g->tats);
	free(g->slots);
	free(g->parts);
	free(g);
}

static void on_announce_part(redisReply *reply, void *arg)
{
	struct announce_part *p = arg;
	struct announce_gather *g = p->g;

	if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 &&
	    reply->element[0]->type == REDIS_REPLY_ARRAY) {
		const redisReply *tats = reply->element[0];
		for (size_t i = 0; i < p->n && i < tats->elements; i++) {
			const redisReply *t = tats->element[i];
			if (t->type == REDIS_REPLY_STRING) {
				free(g->tats[p->idx[i]]);
				g->tats[p->idx[i]] = hub_xstrdup(t->str);
			}
		}
		if (reply->element[1]->type == REDIS_REPLY_ARRAY && hub_redis_up(g->reg->hub->redis))
			detach(g->reg, reply->element[1]);
	} else {
		if (reply && reply->type == REDIS_REPLY_ERROR)
			hub_err("registry: announce failed: %s", reply->str);
		g->failed = true;
	}
	free(p);
	if (!--g->pending)
		announce_finish(g);
}

/* Sends the built calls (the run's slots are marked). */
static void announce_send_parts(struct announce_gather *g)
{
	g->pending++; /* held until every call is sent */
	for (size_t i = 0; i < g->nparts; i++) {
		struct announce_part *p = g->parts[i];
		int rc = g->failed ? -1 :
			 hub_redis_command_formatted(g->reg->hub->redis, on_announce_part, p,
						     p->cmd.data, p->cmd.len);
		hub_buf_free(&p->cmd);
		if (rc) {
			g->failed = true;
			free(p);
			continue;
		}
		g->pending++;
	}
	g->nparts = 0;
	if (!--g->pending)
		announce_finish(g);
}

static void on_marked(redisReply *reply, void *arg)
{
	struct announce_gather *g = arg;

	if (reply && reply->type == REDIS_REPLY_INTEGER) {
		slots_set(g->reg, g->slots, g->nslots);
	} else {
		if (reply && reply->type == REDIS_REPLY_ERROR)
			hub_err("registry: marking the run's slots failed: %s", reply->str);
		g->failed = true; /* nothing is written where no reaper would look */
	}
	announce_send_parts(g);
}

static int announce_split(struct hub_registry *reg, const char *mode, const char *gateway,
			  const char *conn, const char *run,
			  const struct hub_announce_item *items, size_t n,
			  hub_redis_cb cb, void *arg)
{
	struct announce_gather *g = hub_xcalloc(1, sizeof(*g));
	size_t *order = slot_order(items, n, announce_dev);

	g->reg = reg;
	g->cb = cb;
	g->arg = arg;
	g->n = n;
	g->tats = hub_xcalloc(n ? n : 1, sizeof(*g->tats));
	g->parts = hub_xcalloc(n ? n : 1, sizeof(*g->parts));
	g->slots = hub_xmalloc((n ? n : 1) * sizeof(*g->slots));
	for (size_t at = 0, end; at < n; at = end) {
		end = slot_group_end(items, order, at, n, announce_dev);
		struct announce_part *p = hub_xcalloc(1, sizeof(*p) + (end - at) * sizeof(p->idx[0]));
		p->g = g;
		p->n = end - at;
		memcpy(p->idx, order + at, p->n * sizeof(p->idx[0]));
		announce_build(reg, mode, gateway, conn, run, items, p->idx, p->n);
		hub_buf_append(&p->cmd, reg->resp.data, reg->resp.len);
		g->parts[g->nparts++] = p;
	}
	free(order);
	if (reg->resp.cap > RESP_KEEP_MAX)
		hub_buf_free(&reg->resp);
	g->nslots = new_slots(reg, items, n, announce_dev, g->slots);
	if (!g->nslots) {
		announce_send_parts(g);
		return 0;
	}
	if (mark_slots(reg, g->slots, g->nslots, on_marked, g)) {
		for (size_t i = 0; i < g->nparts; i++) {
			hub_buf_free(&g->parts[i]->cmd);
			free(g->parts[i]);
		}
		free(g->tats);
		free(g->slots);
		free(g->parts);
		free(g);
		return -1; /* nothing sent: the caller's callback is not called */
	}
	return 0;
}

static int announce(struct hub *hub, const char *mode, const char *gateway, const char *conn,
		    const struct hub_announce_item *items, size_t n, hub_redis_cb cb, void *arg)
{
	struct hub_registry *reg = hub->registry;
	struct announce_call *ac;
	char run[HUB_KEY_MAX];

	if (!hub_run_of_conn(run, sizeof(run), conn)) {
		hub_err("registry: connection id %s has no run id", conn);
		return -1;
	}
	if (hub_redis_split(hub->redis) && n > 0)
		return announce_split(reg, mode, gateway, conn, run, items, n, cb, arg);

	/* One Redis: one call, after (in the same pipeline as) the marks. */
	unsigned *slots = hub_xmalloc((n ? n : 1) * sizeof(*slots));
	size_t ns = new_slots(reg, items, n, announce_dev, slots);
	if (ns && !mark_slots(reg, slots, ns, NULL, NULL))
		slots_set(reg, slots, ns);
	free(slots);
	announce_build(reg, mode, gateway, conn, run, items, NULL, n);
	ac = hub_xmalloc(sizeof(*ac));
	ac->reg = reg;
	ac->cb = cb;
	ac->arg = arg;
	if (resp_send(reg, on_announce, ac)) {
		free(ac);
		return -1;
	}
	return 0;
}

/* ---- admission ------------------------------------------------------------
 * A reconnect storm hands the hub thousands of connects and announces in a
 * few loop turns. Pipelined at once they make Redis's queue seconds deep,
 * and the lease renewal (hub/lease.c) waits behind them until the lease
 * expires: the hub then re-announces every device and the other hubs reap
 * it, more work on a Redis already behind. The fleet's drop just before
 * is a burst too: an offline and a limits call per closed connection. So
 * these calls are admitted a bounded number at a time (registry-inflight);
 * the others wait here, in order (a connection's offline never overtakes
 * its announce), with a copy of their arguments, and go as replies come
 * back. A call counts as in flight from its sending until its caller's cb
 * ran (an announce or offline split per slot is one call however many
 * commands it takes). */

static size_t offline_send(struct hub_registry *reg, const char *conn,
			   const char *const *devices, const int64_t *tats, size_t n,
			   hub_redis_cb cb, void *arg);

enum call_kind { CALL_CONNECT, CALL_ANNOUNCE, CALL_OFFLINE, CALL_LIMITS };

struct hub_registry_call {
	struct lws_dll2 list;                   /* in the FIFO while waiting */
	struct hub_registry *reg;
	struct hub_registry_call **wait;        /* the caller's handle, or NULL */
	enum call_kind kind;
	hub_redis_cb cb;
	void *arg;
	const char *mode;                       /* announce: "" or "rebuild" (static) */
	char *gateway, *conn;                   /* in the call's block */
	double rate, burst;                     /* connect */
	int64_t tats3[3];                       /* limits */
	size_t parts;                           /* offline: its calls awaiting a reply */
	const char **devices;                   /* offline: n, in the call's block */
	int64_t *tats;                          /* offline: n, in the call's block */
	size_t n;
	struct hub_announce_item items[];       /* announce; then the strings */
};

static void admit_stats(struct hub_registry *reg)
{
	struct hub_metrics *m = &reg->hub->metrics;

	m->registry_inflight = reg->inflight;
	m->registry_queued = (size_t)reg->fifo.count;
	if (reg->inflight > m->registry_inflight_max)
		m->registry_inflight_max = reg->inflight;
}

/* Copies s into the block at *at; returns the copy. */
static char *call_str(char **at, const char *s, size_t len)
{
	char *d = *at;

	memcpy(d, s, len);
	d[len] = '\0';
	*at += len + 1;
	return d;
}

/* One allocation: the call, its n items (announce) or n devices and their
 * TATs (offline), and every string they point to. */
static struct hub_registry_call *call_new(struct hub_registry *reg, enum call_kind kind,
					  const char *gateway, const char *conn,
					  const struct hub_announce_item *items,
					  const char *const *devices, size_t n,
					  hub_redis_cb cb, void *arg)
{
	size_t nitems = items ? n : 0;
	size_t size = sizeof(struct hub_registry_call) + nitems * sizeof(items[0]);
	struct hub_registry_call *k;
	char *at;

	size += (gateway ? strlen(gateway) + 1 : 0) + (conn ? strlen(conn) + 1 : 0);
	for (size_t i = 0; i < nitems; i++)
		size += strlen(items[i].device) + 1 + strlen(items[i].type) + 1 +
			items[i].labels_len + 1;
	for (size_t i = 0; devices && i < n; i++)
		size += sizeof(int64_t) + sizeof(char *) + strlen(devices[i]) + 1;
	k = hub_xcalloc(1, size);
	at = (char *)&k->items[nitems];
	if (devices) { /* the arrays first: they keep the block's alignment */
		k->tats = (int64_t *)(void *)at;
		at += n * sizeof(int64_t);
		k->devices = (const char **)(void *)at;
		at += n * sizeof(char *);
		for (size_t i = 0; i < n; i++)
			k->devices[i] = call_str(&at, devices[i], strlen(devices[i]));
	}
	k->reg = reg;
	k->kind = kind;
	k->cb = cb;
	k->arg = arg;
	k->n = n;
	if (gateway)
		k->gateway = call_str(&at, gateway, strlen(gateway));
	if (conn)
		k->conn = call_str(&at, conn, strlen(conn));
	for (size_t i = 0; i < nitems; i++) {
		k->items[i].device = call_str(&at, items[i].device, strlen(items[i].device));
		k->items[i].type = call_str(&at, items[i].type, strlen(items[i].type));
		k->items[i].labels = call_str(&at, items[i].labels, items[i].labels_len);
		k->items[i].labels_len = items[i].labels_len;
	}
	return k;
}

static void admit_pump(struct hub_registry *reg);

static void on_call_reply(redisReply *reply, void *arg);

/* One of an offline's per-slot calls answered; the last ends it. */
static void on_call_part(redisReply *reply, void *arg)
{
	struct hub_registry_call *k = arg;

	if (!--k->parts)
		on_call_reply(reply, k);
}

/* The call's command(s) answered: its caller's cb, then room for the next. */
static void on_call_reply(redisReply *reply, void *arg)
{
	struct hub_registry_call *k = arg;
	struct hub_registry *reg = k->reg;

	reg->inflight--;
	if (k->cb)
		k->cb(reply, k->arg);
	free(k);
	admit_stats(reg);
	admit_pump(reg);
}

/* Sends k (counted in flight first: on a cluster a split announce may
 * answer before this returns, freeing k). 0, or -1: not sent, k is the
 * caller's. */
static int call_send(struct hub_registry *reg, struct hub_registry_call *k)
{
	int rc;

	reg->inflight++;
	admit_stats(reg);
	switch (k->kind) {
	case CALL_CONNECT:
		rc = connect_send(reg, k->gateway, k->rate, k->burst, on_call_reply, k);
		break;
	case CALL_ANNOUNCE:
		rc = announce(reg->hub, k->mode, k->gateway, k->conn, k->items, k->n,
			      on_call_reply, k);
		break;
	case CALL_LIMITS:
		rc = limits_send(reg, k->gateway, k->tats3[0], k->tats3[1], k->tats3[2],
				 on_call_reply, k);
		break;
	default: /* CALL_OFFLINE: its replies cannot come before this returns */
		k->parts = offline_send(reg, k->conn, k->devices, k->tats, k->n, on_call_part, k);
		rc = k->parts ? 0 : -1;
		break;
	}
	if (rc) {
		reg->inflight--;
		admit_stats(reg);
	}
	return rc;
}

static size_t admit_limit(const struct hub_registry *reg)
{
	int v = reg->hub->cfg.registry_inflight;

	return v > 0 ? (size_t)v : 1;
}

/* Takes the FIFO's k out; its caller's handle is cleared. */
static void queue_del(struct hub_registry *reg, struct hub_registry_call *k)
{
	lws_dll2_remove(&k->list);
	if (k->wait)
		*k->wait = NULL;
	admit_stats(reg);
}

static struct hub_registry_call *queue_head(struct hub_registry *reg)
{
	struct lws_dll2 *d = lws_dll2_get_head(&reg->fifo);

	return d ? lws_container_of(d, struct hub_registry_call, list) : NULL;
}

/* Sends waiting calls while there is room. A call that cannot be sent
 * (Redis went away meanwhile) is answered NULL at once. */
static void admit_pump(struct hub_registry *reg)
{
	if (reg->pumping)
		return;
	reg->pumping = true;
	while (reg->fifo.count && reg->inflight < admit_limit(reg)) {
		struct hub_registry_call *k = queue_head(reg);

		queue_del(reg, k);
		if (call_send(reg, k)) {
			if (k->cb)
				k->cb(NULL, k->arg);
			free(k);
		}
	}
	reg->pumping = false;
}

/* Sends k now, or queues it behind the calls already waiting. */
static int admit(struct hub_registry *reg, struct hub_registry_call *k,
		 struct hub_registry_call **wait)
{
	if (!reg->fifo.count && reg->inflight < admit_limit(reg)) {
		if (call_send(reg, k)) {
			free(k);
			return -1;
		}
		return 0;
	}
	if (!hub_redis_up(reg->hub->redis)) {
		free(k);
		return -1;
	}
	k->wait = wait;
	if (wait)
		*wait = k;
	lws_dll2_add_tail(&k->list, &reg->fifo);
	reg->hub->metrics.registry_queued_total++;
	admit_stats(reg);
	return 0;
}

void hub_registry_cancel(struct hub *hub, struct hub_registry_call **wait)
{
	struct hub_registry_call *k = wait ? *wait : NULL;

	if (!k || !hub->registry)
		return;
	queue_del(hub->registry, k);
	hub->metrics.registry_cancelled_total++;
	if (k->cb)
		k->cb(NULL, k->arg);
	free(k);
}

int hub_registry_connect(struct hub *hub, const char *gateway, double rate, double burst,
			 hub_redis_cb cb, void *arg, struct hub_registry_call **wait)
{
	struct hub_registry *reg = hub->registry;
	struct hub_registry_call *k = call_new(reg, CALL_CONNECT, gateway, NULL, NULL, NULL, 0,
					       cb, arg);

	k->rate = rate;
	k->burst = burst;
	return admit(reg, k, wait);
}

void hub_registry_save_limits(struct hub *hub, const char *gateway, int64_t telemetry_tat,
			      int64_t announce_tat, int64_t ack_tat, bool paced)
{
	struct hub_registry *reg = hub->registry;
	struct hub_registry_call *k;

	if (!paced) {
		limits_send(reg, gateway, telemetry_tat, announce_tat, ack_tat, NULL, NULL);
		return;
	}
	k = call_new(reg, CALL_LIMITS, gateway, NULL, NULL, NULL, 0, NULL, NULL);
	k->tats3[0] = telemetry_tat;
	k->tats3[1] = announce_tat;
	k->tats3[2] = ack_tat;
	admit(reg, k, NULL);
}

void hub_registry_offline(struct hub *hub, const char *conn, const char *const *devices,
			  const int64_t *tats, size_t n)
{
	struct hub_registry *reg = hub->registry;
	struct hub_registry_call *k;

	if (!n)
		return;
	k = call_new(reg, CALL_OFFLINE, NULL, conn, NULL, devices, n, NULL, NULL);
	memcpy(k->tats, tats, n * sizeof(*tats));
	admit(reg, k, NULL);
}

static int announce_admit(struct hub *hub, const char *mode, const char *gateway,
			  const char *conn, const struct hub_announce_item *items, size_t n,
			  hub_redis_cb cb, void *arg, struct hub_registry_call **wait)
{
	struct hub_registry *reg = hub->registry;
	struct hub_registry_call *k = call_new(reg, CALL_ANNOUNCE, gateway, conn, items, NULL, n,
					       cb, arg);

	k->mode = mode;
	return admit(reg, k, wait);
}

int hub_registry_announce(struct hub *hub, const char *gateway, const char *conn,
			  const struct hub_announce_item *items, size_t n,
			  hub_redis_cb cb, void *arg, struct hub_registry_call **wait)
{
	return announce_admit(hub, "", gateway, conn, items, n, cb, arg, wait);
}

int hub_registry_reannounce(struct hub *hub, const char *gateway, const char *conn,
			    const struct hub_announce_item *items, size_t n,
			    hub_redis_cb cb, void *arg, struct hub_registry_call **wait)
{
	return announce_admit(hub, "rebuild", gateway, conn, items, n, cb, arg, wait);
}

void hub_registry_epoch_floor(struct hub *hub, const char *gateway, int64_t epoch)
{
	struct hub_registry *reg = hub->registry;
	char key[HUB_KEY_MAX];

	resp_eval(reg, reg->script_epoch_floor, 1, 1 + 1);
	resp_key(reg, key, hub_key_gw_epoch(key, sizeof(key), gateway));
	resp_int(reg, epoch);
	resp_send(reg, NULL, NULL);
}

/* One offline call over devices idx[0..n) (NULL: all n). */
static int offline_call(struct hub_registry *reg, const char *conn, const char *run,
			const char *const *devices, const int64_t *tats, const size_t *idx,
			size_t n, hub_redis_cb cb, void *arg)
{
	char key[HUB_KEY_MAX];

	resp_eval(reg, reg->script_offline, 2 * n, 2 * n + 3 + 2 * n);
	for (size_t j = 0; j < n; j++) {
		const char *d = devices[idx ? idx[j] : j];
		resp_key(reg, key, hub_key_dev(key, sizeof(key), d));
		resp_key(reg, key, hub_key_idx_run(key, sizeof(key), hub_dev_slot(d), run));
	}
	resp_str(reg, conn);
	resp_int(reg, hub_now_ms());
	resp_arg(reg, HUB_CH_PRESENCE, sizeof(HUB_CH_PRESENCE) - 1);
	for (size_t j = 0; j < n; j++) {
		resp_str(reg, devices[idx ? idx[j] : j]);
		resp_int(reg, tats[idx ? idx[j] : j]);
	}
	return resp_send(reg, cb, arg);
}

static const char *offline_dev(const void *items, size_t i)
{
	return ((const char *const *)items)[i];
}

/* The offline calls of devices (one, or one per slot); cb(arg) once per
 * call sent. Returns how many were sent. */
static size_t offline_send(struct hub_registry *reg, const char *conn,
			   const char *const *devices, const int64_t *tats, size_t n,
			   hub_redis_cb cb, void *arg)
{
	char run[HUB_KEY_MAX];
	size_t sent = 0;

	if (!hub_run_of_conn(run, sizeof(run), conn)) {
		hub_err("registry: connection id %s has no run id", conn);
		return 0;
	}
	if (!hub_redis_split(reg->hub->redis) || n < 2)
		return offline_call(reg, conn, run, devices, tats, NULL, n, cb, arg) ? 0 : 1;
	/* One call per slot: each device goes offline and leaves its slot's
	 * run set in one call, wherever the crash falls. */
	size_t *order = slot_order(devices, n, offline_dev);
	for (size_t at = 0, end; at < n; at = end) {
		end = slot_group_end(devices, order, at, n, offline_dev);
		sent += !offline_call(reg, conn, run, devices, tats, order + at, end - at, cb, arg);
	}
	free(order);
	return sent;
}

/* ---- the module ---------------------------------------------------------- */

static int registry_module_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_registry *reg = hub_xcalloc(1, sizeof(*reg));

	(void)err;
	(void)errlen;
	hub->registry = reg;
	reg->hub = hub;
	reg->script_announce = hub_redis_add_script(hub->redis, hub_lua_announce);
	reg->script_detach = hub_redis_add_script(hub->redis, hub_lua_detach);
	reg->script_offline = hub_redis_add_script(hub->redis, hub_lua_offline);
	reg->script_seen = hub_redis_add_script(hub->redis, hub_lua_seen);
	reg->script_connect = hub_redis_add_script(hub->redis, hub_lua_connect);
	reg->script_limits = hub_redis_add_script(hub->redis, hub_lua_limits);
	reg->script_epoch_floor = hub_redis_add_script(hub->redis, hub_lua_epoch_floor);
	reg->script_slots_mark = hub_redis_add_script(hub->redis, hub_lua_slots_mark);
	snprintf(reg->run_id, sizeof(reg->run_id), "%s:%s", hub->instance_id, hub->run_token);
	return 0;
}

static void registry_module_free(struct hub *hub)
{
	struct hub_registry *reg = hub->registry;

	if (!reg)
		return;
	if (hub->metrics.registry_cancelled_total)
		hub_info("registry: %llu connect/announce calls dropped unsent (their connections "
			 "closed while they waited)",
			 (unsigned long long)hub->metrics.registry_cancelled_total);
	/* Normally empty by now: the bus answered every pending command NULL
	 * when it disconnected, and each answer failed the waiting calls. */
	while (reg->fifo.count) {
		struct hub_registry_call *k = queue_head(reg);
		queue_del(reg, k);
		free(k);
	}
	hub_buf_free(&reg->resp);
	free(reg);
	hub->registry = NULL;
}

const struct hub_module hub_registry_module = {
	.name = "registry",
	.start = registry_module_start,
	.free = registry_module_free,
};
