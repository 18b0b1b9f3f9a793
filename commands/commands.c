#include "commands/commands.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include <libwebsockets.h>
#include <openssl/rand.h>

#include "hub/events.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/slot.h"
#include "hub/util.h"
#include "hub/link.h"
#include "protocols/gw_codec.h"
#include "hub_lua.h"

#define SWEEP_US       (1000 * 1000)
#define SWEEP_TOKEN_MS "900"          /* a sweep token's life: under SWEEP_US */
#define SWEEP_BATCH    "256"
#define SWEEP_SLOTS    1024   /* slot timers read per sweep (rotating) */
#define UNION_KEYS     1024   /* keys read by one call on one Redis */
#define DUE_KEYS       128    /* slots' timers read by one cmd_due call (one Redis) */

/* ---- the scripts ------------------------------------------------------------
 * hub/lua/cmd_*.lua and rollout_*.lua (each file's top comment is its
 * contract). Every key they touch comes in their KEYS, built below through
 * hub/keys.h; where a key depends on what Redis holds (a command's device,
 * a device's or a rollout's command ids, a type's devices), that is read
 * first and the script called with it. */

enum { S_CREATE, S_SEND, S_ACK, S_CANCEL, S_TICK, S_GET, S_LIST,
       S_RCREATE, S_RSTEP, S_RGET, S_OWED, S_DEVICES, S_DUE, S_RCTL,
       S_RADD, S_RSTATE, S_RONE, S__COUNT };

/* ---- engine state ---------------------------------------------------------- */

struct timer_ent {
	int64_t at;
	char id[CMD_ID_MAX + 1];
};

/* The engine: hub->cmd, created by the module's start. */
struct cmd_engine {
	struct hub *hub;
	int scripts[S__COUNT];
	lws_sorted_usec_list_t sul_timer, sul_sweep;
	int64_t armed_at;            /* INT64_MAX: not armed */
	struct timer_ent *heap;      /* a min-heap of deadlines */
	size_t n, cap;
	char ctl_channel[HUB_KEY_MAX];
	struct hub_redis_channel *ctl;
	unsigned sweep_next;         /* the next slot the sweep reads */
	/* On one Redis, a sweep walks the marked slots DUE_KEYS at a time,
	 * one call in flight: due[due_at..due_n) are still to read. */
	uint16_t *due;
	size_t due_n, due_at;
	bool due_walking, stopped;
};

static const char *const states[] = {
	"queued", "sent", "received", "in_progress", "succeeded", "failed", "rejected",
	"timed_out", "expired", "canceled",
};

bool cmd_state_valid(const char *s)
{
	for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++)
		if (!strcmp(s, states[i]))
			return true;
	return false;
}

bool cmd_state_final(const char *s)
{
	return !strcmp(s, "succeeded") || !strcmp(s, "failed") || !strcmp(s, "rejected") ||
	       !strcmp(s, "timed_out") || !strcmp(s, "expired") || !strcmp(s, "canceled");
}

bool cmd_id_valid(const char *id)
{
	size_t n = strlen(id), i;

	if (n < 34 || n > CMD_ID_MAX || (id[0] != 'c' && id[0] != 'r') || id[1] != '_')
		return false;
	for (i = 2; i < 34; i++)
		if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f')))
			return false;
	if (i == n)
		return true;
	if (id[0] != 'c' || id[i] != '_' || i + 1 == n)
		return false; /* a rollout's command: c_<hex>_<n> */
	for (i++; i < n; i++)
		if (id[i] < '0' || id[i] > '9')
			return false;
	return true;
}

void cmd_new_id_for(char out[35], const char *device)
{
	do
		cmd_new_id(out, 'c');
	while (!hub_slot_fit_id(out, 34, hub_dev_slot(device)));
}

void cmd_new_rollout_id(char out[35])
{
	do
		cmd_new_id(out, 'r');
	while (!hub_slot_fit_id(out, 34, hub_slot("hub", 3)));
}

void cmd_new_id(char out[35], char prefix)
{
	unsigned char b[16];

	if (RAND_bytes(b, sizeof(b)) != 1)
		abort();
	out[0] = prefix;
	out[1] = '_';
	for (int i = 0; i < 16; i++)
		snprintf(out + 2 + i * 2, 3, "%02x", b[i]);
}

/* ---- script calls, built in RESP form ---------------------------------------
 * call_begin, then the KEYS (call_key, call_group), then the ARGV (call_now,
 * call_arg ...), then call_send. */

/* Starts a call of script s with nkeys KEYS and nargs ARGV. A script of
 * hub/lua/_command.lua (with_now) has two arguments more first, `now` and
 * the commands channel (call_now). */
static void call_begin(struct cmd_engine *E, hub_buf *b, int s, size_t nkeys, size_t nargs, bool with_now)
{
	b->len = 0;
	hub_resp_head(b, 3 + nkeys + nargs + (with_now ? 2 : 0));
	hub_resp_evalsha(b, E->hub->redis, E->scripts[s], nkeys);
}

/* The slot of a command's keys (iot:cmd:{<id>}): of its id, which is drawn
 * in its device's slot. */
static unsigned id_slot(const char *id)
{
	return hub_crc16(id, strlen(id)) & (HUB_SLOTS - 1);
}

/* A key from its builder's length (0, an invalid name, gives "": the script
 * finds it empty). */
static void call_key(hub_buf *b, const char *key, size_t len)
{
	hub_resp_arg(b, key, len);
}

static void call_arg(hub_buf *b, const char *s)
{
	hub_resp_str(b, s);
}

/* How many keys a command's group has (hub/lua/_command.lua): cmd, log
 * and timers, and dev and cmds when its device is known. */
static size_t group_len(const char *device)
{
	return device && *device ? 5 : 3;
}

static void call_group(hub_buf *b, const char *id, const char *device)
{
	char k[HUB_KEY_MAX];

	call_key(b, k, hub_key_cmd(k, sizeof(k), id));
	call_key(b, k, hub_key_cmd_log(k, sizeof(k), id));
	call_key(b, k, hub_key_idx_timers(k, sizeof(k), id_slot(id)));
	if (group_len(device) == 5) {
		call_key(b, k, hub_key_dev(k, sizeof(k), device));
		call_key(b, k, hub_key_dev_cmds(k, sizeof(k), device));
	}
}

/* `now` and the commands channel: the ARGV of a with_now call start with them. */
static void call_now(hub_buf *b)
{
	hub_resp_int(b, hub_now_ms());
	hub_resp_arg(b, HUB_CH_COMMANDS, sizeof(HUB_CH_COMMANDS) - 1);
}

/* Sends and frees b: 0 (cb runs once) or -1 (Redis is down). */
static int call_send(struct cmd_engine *E, hub_buf *b, hub_redis_cb cb, void *arg)
{
	int rc = hub_redis_command_formatted(E->hub->redis, cb, arg, b->data, b->len);

	hub_buf_free(b);
	return rc;
}

/* Reads a command's device (a read before a script that needs its keys):
 * HGET, the reply to cb. */
static int read_device(struct cmd_engine *E, const char *id, hub_redis_cb cb, void *arg)
{
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "HGET", key, "device" };

	if (!hub_key_cmd(key, sizeof(key), id))
		return -1;
	return hub_redis_command_argv(E->hub->redis, cb, arg, 3, argv, NULL);
}

/* The device of read_device's reply: "" when the command is gone, NULL when
 * Redis did not answer. */
static const char *device_of(const redisReply *r)
{
	if (!r || r->type == REDIS_REPLY_ERROR)
		return NULL;
	return r->type == REDIS_REPLY_STRING ? r->str : "";
}

static const char *el_str(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
		return NULL;
	r = r->element[i];
	return r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS ? r->str : NULL;
}

static long long el_int(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
		return 0;
	r = r->element[i];
	if (r->type == REDIS_REPLY_INTEGER)
		return r->integer;
	if (r->type == REDIS_REPLY_STRING)
		return strtoll(r->str, NULL, 10);
	return 0;
}

/* ---- timers: a min-heap of deadlines on one lws timer ---------------------- */

static void timer_cb(lws_sorted_usec_list_t *sul);

static void heap_swap(struct cmd_engine *E, size_t a, size_t b)
{
	struct timer_ent t = E->heap[a];

	E->heap[a] = E->heap[b];
	E->heap[b] = t;
}

static void arm(struct cmd_engine *E)
{
	int64_t now = hub_now_ms();

	if (!E->n)
		return;
	if (E->heap[0].at >= E->armed_at)
		return; /* already armed earlier */
	E->armed_at = E->heap[0].at;
	lws_sul_schedule(E->hub->ctx, 0, &E->sul_timer, timer_cb,
			 E->armed_at > now ? (lws_usec_t)(E->armed_at - now) * 1000 : 1);
}

void cmd_track(struct hub *hub, const char *id, int64_t at)
{
	struct cmd_engine *E = hub->cmd;
	size_t i;

	if (!E || at <= 0 || strlen(id) >= sizeof(E->heap[0].id))
		return;
	if (E->n == E->cap) {
		E->cap = E->cap ? E->cap * 2 : 64;
		E->heap = hub_xrealloc(E->heap, E->cap * sizeof(*E->heap));
	}
	i = E->n++;
	E->heap[i].at = at;
	snprintf(E->heap[i].id, sizeof(E->heap[i].id), "%s", id);
	while (i && E->heap[(i - 1) / 2].at > E->heap[i].at) {
		heap_swap(E, i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
	arm(E);
}

static void heap_pop(struct cmd_engine *E)
{
	size_t i = 0;

	E->heap[0] = E->heap[--E->n];
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < E->n && E->heap[l].at < E->heap[m].at)
			m = l;
		if (r < E->n && E->heap[r].at < E->heap[m].at)
			m = r;
		if (m == i)
			break;
		heap_swap(E, i, m);
		i = m;
	}
}

static void local_deliver(struct cmd_engine *E, const char *id, const char *device);
static void route_to(struct cmd_engine *E, const char *instance, const char *verb, const char *id,
		     const char *device);

/* A deadline of one command, on its way through its tick. */
struct tick_ctx {
	struct cmd_engine *E;
	char id[CMD_ID_MAX + 1];
};

static void on_tick(redisReply *r, void *arg)
{
	struct tick_ctx *t = arg;
	struct cmd_engine *E = t->E;
	const char *id = t->id;
	long long kind = el_int(r, 0);

	if (kind == 0 && el_int(r, 1) > 0) {
		cmd_track(E->hub, id, el_int(r, 1));
	} else if (kind == 1) {
		hub_metrics_command_final(&E->hub->metrics, el_str(r, 1));
	} else if (kind == 2) {
		const char *dev = el_str(r, 1), *inst = el_str(r, 2), *online = el_str(r, 3);
		cmd_track(E->hub, id, el_int(r, 4));
		if (dev && inst && !strcmp(inst, E->hub->instance_id)) {
			local_deliver(E, id, dev);
		} else if (dev && inst && online && !strcmp(online, "1")) {
			route_to(E, inst, "deliver", id, dev);
		}
	}
	free(t);
}

/* The command's device was read: the tick, with its keys. */
static void on_tick_device(redisReply *r, void *arg)
{
	struct tick_ctx *t = arg;
	struct cmd_engine *E = t->E;
	const char *id = t->id, *dev = device_of(r);
	hub_buf b = { 0 };

	if (!dev) {
		free(t); /* Redis did not answer: the sweep finds it again */
		return;
	}
	call_begin(E, &b, S_TICK, group_len(dev), 2, true);
	call_group(&b, id, dev);
	call_now(&b);
	call_arg(&b, id);
	call_arg(&b, dev);
	if (call_send(E, &b, on_tick, t))
		free(t);
}

static void tick(struct cmd_engine *E, const char *id)
{
	struct tick_ctx *t = hub_xcalloc(1, sizeof(*t));

	t->E = E;
	if (strlen(id) < sizeof(t->id))
		memcpy(t->id, id, strlen(id) + 1);
	if (!*t->id || read_device(E, t->id, on_tick_device, t)) {
		char key[HUB_KEY_MAX];
		const char *argv[3] = { "ZREM", key, id };
		hub_key_idx_timers(key, sizeof(key), id_slot(id));
		free(t); /* not a command id: it only leaves the timers */
		hub_redis_command_argv(E->hub->redis, NULL, NULL, 3, argv, NULL);
	}
}

static void timer_cb(lws_sorted_usec_list_t *sul)
{
	struct cmd_engine *E = lws_container_of(sul, struct cmd_engine, sul_timer);
	int64_t now = hub_now_ms();

	E->armed_at = INT64_MAX;
	while (E->n && E->heap[0].at <= now) {
		char id[CMD_ID_MAX + 1];
		memcpy(id, E->heap[0].id, sizeof(id));
		heap_pop(E);
		tick(E, id);
	}
	arm(E);
}

static void on_sweep(redisReply *r, void *arg)
{
	struct cmd_engine *E = arg;

	for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++)
		if (r->element[i]->type == REDIS_REPLY_STRING)
			tick(E, r->element[i]->str);
}

static void on_step(redisReply *r, void *arg)
{
	struct cmd_engine *E = arg;

	if (el_int(r, 0) != 1)
		return;
	for (size_t i = 1; i + 4 < r->elements; i += 5) {
		const char *id = el_str(r, i), *dev = el_str(r, i + 1), *inst = el_str(r, i + 2),
			   *online = el_str(r, i + 3);
		if (!id || !dev)
			continue;
		cmd_track(E->hub, id, el_int(r, i + 4));
		cmd_route(E->hub, id, dev, inst, online && !strcmp(online, "1"));
	}
}

/* A release step of a rollout: its command ids (LRANGE), their devices
 * (cmd_devices), then rollout_step with the keys of them all. */
struct step_ctx {
	struct cmd_engine *E;
	char rid[CMD_ID_MAX + 1];
	hub_buf ids;               /* the command ids, each NUL-terminated */
	size_t n;
};

static void step_free(struct step_ctx *st)
{
	hub_buf_free(&st->ids);
	free(st);
}

/* Element i of an array reply as a string ("" when it is not one). */
static const char *el_or_empty(const redisReply *r, size_t i)
{
	const char *v = el_str(r, i);

	return v ? v : "";
}

static void on_step_devices(redisReply *r, void *arg)
{
	struct step_ctx *st = arg;
	struct cmd_engine *E = st->E;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];
	size_t nkeys = 3;
	const char *id;

	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != st->n) {
		step_free(st); /* the next sweep steps it */
		return;
	}
	for (size_t i = 0; i < st->n; i++)
		nkeys += group_len(el_or_empty(r, i));
	call_begin(E, &b, S_RSTEP, nkeys, 1 + st->n, true);
	call_key(&b, k, hub_key_rollout(k, sizeof(k), st->rid));
	call_key(&b, k, hub_key_rollout_cmds(k, sizeof(k), st->rid));
	call_key(&b, HUB_KEY_ROLLOUTS_ACTIVE, sizeof(HUB_KEY_ROLLOUTS_ACTIVE) - 1);
	id = st->ids.data;
	for (size_t i = 0; i < st->n; i++, id += strlen(id) + 1)
		call_group(&b, id, el_or_empty(r, i));
	call_now(&b);
	call_arg(&b, st->rid);
	for (size_t i = 0; i < st->n; i++)
		call_arg(&b, el_or_empty(r, i));
	call_send(E, &b, on_step, E);
	step_free(st);
}

static void on_step_ids(redisReply *r, void *arg)
{
	struct step_ctx *st = arg;
	struct cmd_engine *E = st->E;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	if (!r || r->type != REDIS_REPLY_ARRAY) {
		step_free(st);
		return;
	}
	st->n = r->elements;
	call_begin(E, &b, S_DEVICES, st->n, 0, false);
	for (size_t i = 0; i < st->n; i++) {
		const char *id = el_or_empty(r, i);
		hub_buf_append(&st->ids, id, strlen(id) + 1);
		call_key(&b, k, hub_key_cmd(k, sizeof(k), id));
	}
	if (call_send(E, &b, on_step_devices, st))
		step_free(st);
}

static void rollout_step_split(struct cmd_engine *E, const char *rid);

static void rollout_step(struct cmd_engine *E, const char *rid)
{
	struct step_ctx *st;
	char key[HUB_KEY_MAX];
	const char *argv[4] = { "LRANGE", key, "0", "-1" };

	if (!hub_key_rollout_cmds(key, sizeof(key), rid) || strlen(rid) > CMD_ID_MAX)
		return;
	if (hub_redis_split(E->hub->redis)) {
		rollout_step_split(E, rid);
		return;
	}
	st = hub_xcalloc(1, sizeof(*st));
	st->E = E;
	snprintf(st->rid, sizeof(st->rid), "%s", rid);
	if (hub_redis_command_argv(E->hub->redis, on_step_ids, st, 4, argv, NULL))
		step_free(st);
}

static void on_active_rollouts(redisReply *r, void *arg)
{
	struct cmd_engine *E = arg;

	if (r && r->type == REDIS_REPLY_ARRAY)
		E->hub->metrics.rollouts_active = r->elements;
	for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++)
		if (r->element[i]->type == REDIS_REPLY_STRING)
			rollout_step(E, r->element[i]->str);
}

static void due_next(struct cmd_engine *E);

static void on_due(redisReply *r, void *arg)
{
	struct cmd_engine *E = arg;

	on_sweep(r, arg);
	if (!r || E->stopped) {
		E->due_walking = false; /* Redis lost or stopping: the next sweep starts over */
		return;
	}
	due_next(E);
}

/* The next DUE_KEYS marked slots' timers, or the walk's end. One call at a
 * time: a call of 1,024 keys held Redis for 2-8 ms, sixteen of them each
 * second once every slot held devices, and the store calls queued behind
 * them set W3's p99; one of 128 holds it for a few hundred us. */
static void due_next(struct cmd_engine *E)
{
	size_t n = E->due_n - E->due_at;
	char key[HUB_KEY_MAX], now[24];
	hub_buf b = { 0 };

	if (n > DUE_KEYS)
		n = DUE_KEYS;
	if (!n) {
		E->due_walking = false;
		return;
	}
	snprintf(now, sizeof(now), "%" PRId64, hub_now_ms());
	call_begin(E, &b, S_DUE, n, 2, false);
	for (size_t i = 0; i < n; i++)
		call_key(&b, key, hub_key_idx_timers(key, sizeof(key), E->due[E->due_at + i]));
	call_arg(&b, now);
	call_arg(&b, SWEEP_BATCH);
	E->due_at += n;
	if (call_send(E, &b, on_due, E))
		E->due_walking = false;
}

static bool slot_is_marked(const redisReply *dir, unsigned s)
{
	return s / 8 < dir->len && (((unsigned char)dir->str[s / 8]) & (0x80u >> (s % 8)));
}

/* The slot directory was read. On one Redis: the timers of every marked
 * slot, walked DUE_KEYS slots a call (a walk still going when the next
 * second comes is left to finish). Where calls keep to one slot: the
 * timers of the next SWEEP_SLOTS slots that hold devices (all of them each
 * second up to that many; beyond, a rotating share). */
static void on_sweep_slots(redisReply *r, void *arg)
{
	struct cmd_engine *E = arg;
	char now[24];
	unsigned seen = 0, s = E->sweep_next, scanned = 0;

	if (!r || r->type != REDIS_REPLY_STRING || E->stopped)
		return;
	if (!hub_redis_split(E->hub->redis)) {
		if (E->due_walking)
			return;
		if (!E->due)
			E->due = hub_xmalloc(HUB_SLOTS * sizeof(*E->due));
		E->due_n = E->due_at = 0;
		for (unsigned k = 0; k < HUB_SLOTS; k++)
			if (slot_is_marked(r, k))
				E->due[E->due_n++] = (uint16_t)k;
		E->due_walking = true;
		due_next(E);
		return;
	}
	snprintf(now, sizeof(now), "%" PRId64, hub_now_ms());
	for (; scanned < HUB_SLOTS && seen < SWEEP_SLOTS; scanned++, s = (s + 1) % HUB_SLOTS) {
		char key[HUB_KEY_MAX];
		const char *argv[7] = { "ZRANGEBYSCORE", key, "-inf", now, "LIMIT", "0",
					SWEEP_BATCH };

		if (!slot_is_marked(r, s))
			continue;
		seen++;
		hub_key_idx_timers(key, sizeof(key), s);
		if (hub_redis_command_argv(E->hub->redis, on_sweep, E, 7, argv, NULL))
			break;
	}
	E->sweep_next = s;
}

/* Overdue deadlines of any instance (a crashed one's, or ours before a
 * restart): the timers of every slot that holds devices (the slot
 * directory, HUB_KEY_SLOTS): on one Redis all of them each second, a few
 * cmd_due calls; where calls keep to one slot, one query per slot, up to
 * SWEEP_SLOTS slots a second (rotating); and a release
 * step for every running rollout (atomic: any instance may). */
static void read_slots(struct cmd_engine *E)
{
	const char *sl[2] = { "GET", HUB_KEY_SLOTS };

	hub_redis_command_argv(E->hub->redis, on_sweep_slots, E, 2, sl, NULL);
}

/* The sweep token of this second: only the hub that took it sweeps. */
static void on_sweep_token(redisReply *r, void *arg)
{
	if (r && r->type == REDIS_REPLY_STATUS && !strcmp(r->str, "OK"))
		read_slots(arg);
}

/* On one Redis every hub used to sweep every slot each second: with
 * 100,000 devices (all 16,384 slots marked) that was 16,384 ZRANGEBYSCORE
 * a second per hub, 11 % of Redis's core for 7 idle hubs. Now the hubs
 * race for a token that lives SWEEP_TOKEN_MS (SET NX PX): one sweep a
 * second for the fleet, by whichever hub is up to take it. On a cluster
 * each hub still reads its rotating share of the slots. */
static void sweep_cb(lws_sorted_usec_list_t *sul)
{
	struct cmd_engine *E = lws_container_of(sul, struct cmd_engine, sul_sweep);
	struct hub *hub = E->hub;

	if (hub_redis_up(hub->redis)) {
		const char *ra[4] = { "ZRANGE", HUB_KEY_ROLLOUTS_ACTIVE, "0", "-1" };

		if (hub_redis_split(hub->redis)) {
			read_slots(E);
		} else {
			char run[HUB_ID_MAX + 32];
			const char *tk[6] = { "SET", HUB_KEY_SWEEP, run, "NX", "PX",
					      SWEEP_TOKEN_MS };

			snprintf(run, sizeof(run), "%s:%s", hub->instance_id, hub->run_token);
			hub_redis_command_argv(hub->redis, on_sweep_token, E, 6, tk, NULL);
		}
		hub_redis_command_argv(hub->redis, on_active_rollouts, E, 4, ra, NULL);
	}
	lws_sul_schedule(E->hub->ctx, 0, &E->sul_sweep, sweep_cb, SWEEP_US);
}

/* ---- delivery -------------------------------------------------------------- */

struct send_ctx {
	struct cmd_engine *E;
	struct hub_link *conn;
	char id[CMD_ID_MAX + 1];
};

static void on_sent(redisReply *r, void *arg)
{
	struct send_ctx *s = arg;

	if (el_int(r, 0) == 1 && hub_link_open(s->conn)) {
		hub_buf m = { 0 };
		const char *dev = el_str(r, 1), *name = el_str(r, 2), *params = el_str(r, 3);

		hub_buf_puts(&m, "{\"type\":\"command\",\"id\":");
		hub_buf_json_str(&m, s->id, strlen(s->id));
		hub_buf_puts(&m, ",\"device\":");
		hub_buf_json_str(&m, dev ? dev : "", dev ? strlen(dev) : 0);
		hub_buf_puts(&m, ",\"name\":");
		hub_buf_json_str(&m, name ? name : "", name ? strlen(name) : 0);
		hub_buf_puts(&m, ",\"params\":");
		hub_buf_puts(&m, params && *params ? params : "{}");
		hub_buf_puts(&m, ",\"attempt\":");
		hub_buf_i64(&m, el_int(r, 4));
		hub_buf_puts(&m, ",\"expires_at\":");
		hub_buf_i64(&m, el_int(r, 5));
		hub_buf_puts(&m, "}");
		hub_link_send(s->conn, m.data, m.len);
		hub_buf_free(&m);
		s->E->hub->metrics.commands_sent_total++;
		cmd_track(s->E->hub, s->id, el_int(r, 6));
	}
	hub_link_release(s->conn);
	free(s);
}

static void send_to(struct cmd_engine *E, struct hub_link *c, const char *id, const char *device)
{
	struct send_ctx *s = hub_xcalloc(1, sizeof(*s));
	hub_buf b = { 0 };

	s->E = E;
	snprintf(s->id, sizeof(s->id), "%s", id);
	s->conn = c;
	hub_link_hold(c);
	call_begin(E, &b, S_SEND, group_len(device), 3, true);
	call_group(&b, id, device);
	call_now(&b);
	call_arg(&b, id);
	call_arg(&b, hub_link_id(c));
	call_arg(&b, device);
	if (call_send(E, &b, on_sent, s)) {
		hub_link_release(c);
		free(s);
	}
}

static void local_deliver(struct cmd_engine *E, const char *id, const char *device)
{
	struct hub_link *c = hub_link_for_device(E->hub, device);

	if (c)
		send_to(E, c, id, device); /* else: it goes out when the device is next announced */
}

/* What a device's gateway is owed when it is announced (hub/lua/cmd_owed.lua). */
static void send_cancel_local(struct cmd_engine *E, const char *id, const char *device);

static void on_owed(redisReply *r, void *arg)
{
	struct cmd_engine *E = arg;

	for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 2 < r->elements; i += 3) {
		const char *dev = el_str(r, i);
		const redisReply *cancels = r->element[i + 1], *ids = r->element[i + 2];
		struct hub_link *c = dev ? hub_link_for_device(E->hub, dev) : NULL;

		if (!c)
			continue; /* gone again: its next announce asks again */
		for (size_t j = 0; cancels->type == REDIS_REPLY_ARRAY && j < cancels->elements; j++)
			if (cancels->element[j]->type == REDIS_REPLY_STRING)
				send_cancel_local(E, cancels->element[j]->str, dev);
		for (size_t j = 0; ids->type == REDIS_REPLY_ARRAY && j < ids->elements; j++)
			if (ids->element[j]->type == REDIS_REPLY_STRING)
				send_to(E, c, ids->element[j]->str, dev); /* in creation order */
	}
}

/* Devices were announced on a local link: what they are owed goes out. */
static void on_announced(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	const struct hub_ev_announced *a = payload;
	const char *const *devices = a->devices;
	size_t n = a->n;
	struct cmd_engine *E = hub->cmd;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	(void)ev;
	(void)ctx;
	if (!n)
		return;
	/* One call for the whole announce on one Redis; one per device (its
	 * two keys share its slot) where calls must keep to one slot. */
	size_t per = hub_redis_split(hub->redis) ? 1 : n;
	for (size_t at = 0; at < n; at += per) {
		size_t m = n - at < per ? n - at : per;
		call_begin(E, &b, S_OWED, 2 * m, m, false);
		for (size_t i = at; i < at + m; i++) {
			call_key(&b, k, hub_key_dev_cancels(k, sizeof(k), devices[i]));
			call_key(&b, k, hub_key_dev_cmds(k, sizeof(k), devices[i]));
		}
		for (size_t i = at; i < at + m; i++)
			call_arg(&b, devices[i]);
		call_send(E, &b, on_owed, E);
	}
}

static void route_to(struct cmd_engine *E, const char *instance, const char *verb, const char *id,
		     const char *device)
{
	char ch[HUB_KEY_MAX], msg[256];

	if (!hub_ch_ctl_cmd(ch, sizeof(ch), instance))
		return;
	snprintf(msg, sizeof(msg), "%s %s %s", verb, id, device);
	/* On a cluster, the instance's sharded channel: reaches the one
	 * primary of its slot (a classic PUBLISH would reach every node). On
	 * one Redis a classic PUBLISH on the same name, as before: the pub/sub
	 * connection is up before the hub listens, the sharded one may not be. */
	if (hub_redis_cluster(E->hub->redis))
		hub_redis_spublish(E->hub->redis, ch, msg, strlen(msg), NULL, NULL);
	else
		hub_redis_publish(E->hub->redis, ch, msg, strlen(msg));
}

bool cmd_routable(const struct hub *hub)
{
	const struct cmd_engine *E = hub->cmd;

	return !E || !hub_redis_cluster(hub->redis) || hub_redis_channel_active(E->ctl);
}

void cmd_route(struct hub *hub, const char *id, const char *device, const char *instance,
	       bool online)
{
	struct cmd_engine *E = hub->cmd;

	if (!E)
		return;
	if (hub_link_for_device(hub, device))
		local_deliver(E, id, device);
	else if (online && instance && *instance && strcmp(instance, hub->instance_id))
		route_to(E, instance, "deliver", id, device);
}

/* ---- cancel ---------------------------------------------------------------- */

static void send_cancel_local(struct cmd_engine *E, const char *id, const char *device)
{
	struct hub_link *c = hub_link_for_device(E->hub, device);
	hub_buf m = { 0 };

	if (!c)
		return;
	hub_buf_puts(&m, "{\"type\":\"cancel\",\"id\":");
	hub_buf_json_str(&m, id, strlen(id));
	hub_buf_puts(&m, ",\"device\":");
	hub_buf_json_str(&m, device, strlen(device));
	hub_buf_puts(&m, "}");
	hub_link_send(c, m.data, m.len);
	hub_buf_free(&m);
	/* Told: no longer owed at the next announce. */
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "SREM", key, id };
	if (hub_key_dev_cancels(key, sizeof(key), device))
		hub_redis_command_argv(E->hub->redis, NULL, NULL, 3, argv, NULL);
}

struct cancel_route {
	struct cmd_engine *E;
	char id[CMD_ID_MAX + 1];
	char device[HUB_ID_MAX + 1];
};

static void on_cancel_where(redisReply *r, void *arg)
{
	struct cancel_route *cr = arg;
	const char *inst = el_str(r, 0), *online = el_str(r, 1);

	if (inst && online && !strcmp(online, "1") && strcmp(inst, cr->E->hub->instance_id))
		route_to(cr->E, inst, "cancel", cr->id, cr->device);
	free(cr);
}

void cmd_route_cancel(struct hub *hub, const char *id, const char *device)
{
	struct cancel_route *cr;
	char key[HUB_KEY_MAX];
	const char *argv[4] = { "HMGET", key, "instance", "online" };

	if (!hub->cmd)
		return;
	if (hub_link_for_device(hub, device)) {
		send_cancel_local(hub->cmd, id, device);
		return;
	}
	if (!hub_key_dev(key, sizeof(key), device))
		return;
	cr = hub_xcalloc(1, sizeof(*cr));
	cr->E = hub->cmd;
	snprintf(cr->id, sizeof(cr->id), "%s", id);
	snprintf(cr->device, sizeof(cr->device), "%s", device);
	if (hub_redis_command_argv(hub->redis, on_cancel_where, cr, 4, argv, NULL))
		free(cr);
}

/* ---- routed work from other instances -------------------------------------- */

static void on_ctl(const char *channel, const char *payload, size_t len, void *arg)
{
	struct cmd_engine *E = arg;
	char buf[320], *verb, *id, *dev, *save = NULL;

	(void)channel;
	if (len >= sizeof(buf))
		return;
	memcpy(buf, payload, len);
	buf[len] = '\0';
	verb = strtok_r(buf, " ", &save);
	id = strtok_r(NULL, " ", &save);
	dev = strtok_r(NULL, " ", &save);
	if (!verb || !id || !dev)
		return;
	if (!strcmp(verb, "deliver"))
		local_deliver(E, id, dev);
	else if (!strcmp(verb, "cancel"))
		send_cancel_local(E, id, dev);
}

/* ---- acks ------------------------------------------------------------------ */

struct ack_ctx {
	struct cmd_engine *E;
	struct hub_link *conn;
	char id[160];
	hub_buf args;              /* RESP of the ack's ARGV but the device */
};

static void on_acked(redisReply *r, void *arg)
{
	struct ack_ctx *a = arg;

	if (((r && r->type == REDIS_REPLY_ARRAY && el_int(r, 0) == -1) || (!r && !cmd_id_valid(a->id))) &&
	    hub_link_open(a->conn)) {
		hub_buf m = { 0 };
		hub_buf_puts(&m, "{\"type\":\"error\",\"code\":\"unknown_command\",\"id\":");
		hub_buf_json_str(&m, a->id, strlen(a->id));
		hub_buf_puts(&m, ",\"message\":\"no command with this id for a device announced on this connection\"}");
		hub_link_send(a->conn, m.data, m.len);
		hub_buf_free(&m);
	}
	if (r && r->type == REDIS_REPLY_ARRAY)
		a->E->hub->metrics.command_acks_total++;
	if (el_int(r, 0) == 1) /* applied: final when the status is one */
		hub_metrics_command_final(&a->E->hub->metrics, el_str(r, 1));
	hub_link_release(a->conn);
	hub_buf_free(&a->args);
	free(a);
}

/* The command's device was read: the ack, with its keys (none of the
 * device's when the command is gone: the script answers {-1}). */
static void on_ack_device(redisReply *r, void *arg)
{
	struct ack_ctx *a = arg;
	struct cmd_engine *E = a->E;
	const char *dev = device_of(r);
	hub_buf b = { 0 };

	if (!dev) {
		on_acked(r, a);
		return;
	}
	call_begin(E, &b, S_ACK, group_len(dev), 8, true);
	call_group(&b, a->id, dev);
	call_now(&b);
	hub_buf_append(&b, a->args.data, a->args.len);
	call_arg(&b, dev);
	if (call_send(E, &b, on_acked, a)) {
		hub_link_release(a->conn);
		hub_buf_free(&a->args);
		free(a);
	}
}

/* A gateway acknowledged a command. */
static void on_ack(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	const struct hub_ev_command_ack *e = payload;
	struct hub_link *c = e->link;
	const struct gw_command_ack *ack = e->ack;
	const char *conn_id = hub_link_id(c);
	struct ack_ctx *a = hub_xcalloc(1, sizeof(*a));
	char progress[32] = "";
	char *result = ack->result ? json_dumps(ack->result, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
	struct cmd_engine *E = hub->cmd;

	(void)ev;
	(void)ctx;
	a->E = E;
	snprintf(a->id, sizeof(a->id), "%s", ack->id);
	a->conn = c;
	hub_link_hold(c);
	if (ack->progress && json_is_number(ack->progress)) {
		double p = json_number_value(ack->progress);
		if (p < 0)
			p = 0;
		if (p > 100)
			p = 100;
		snprintf(progress, sizeof(progress), "%g", p);
	}
	call_arg(&a->args, ack->id);
	call_arg(&a->args, conn_id);
	call_arg(&a->args, ack->status);
	call_arg(&a->args, progress);
	call_arg(&a->args, ack->message ? ack->message : "");
	call_arg(&a->args, result ? result : "");
	call_arg(&a->args, ack->error ? ack->error : "");
	if (!cmd_id_valid(ack->id)) {
		on_acked(NULL, a); /* answers unknown_command, releases */
	} else if (read_device(E, ack->id, on_ack_device, a)) {
		hub_link_release(c);
		hub_buf_free(&a->args);
		free(a);
	}
	free(result);
}

/* ---- API entry points ------------------------------------------------------ */

/* An API call whose script needs what Redis holds first: the caller's cb
 * and arg (called exactly once), the name the read was about, and the
 * script's ARGV known up front, in RESP form. */
struct then_ctx {
	struct cmd_engine *E;
	hub_redis_cb cb;
	void *arg;
	char name[HUB_KEY_MAX];
	hub_buf args;
};

static struct then_ctx *then_new(struct cmd_engine *E, hub_redis_cb cb, void *arg,
				  const char *name)
{
	struct then_ctx *t = hub_xcalloc(1, sizeof(*t));

	t->E = E;
	t->cb = cb;
	t->arg = arg;
	snprintf(t->name, sizeof(t->name), "%s", name);
	return t;
}

static void then_free(struct then_ctx *t)
{
	hub_buf_free(&t->args);
	free(t);
}

/* The read failed (r NULL or an error): the caller gets that. */
static void then_fail(struct then_ctx *t, redisReply *r)
{
	t->cb(r, t->arg);
	then_free(t);
}

/* Sends the script call b; the caller's cb gets its reply (NULL when Redis
 * went down meanwhile). */
static void then_send(struct then_ctx *t, hub_buf *b)
{
	if (call_send(t->E, b, t->cb, t->arg))
		t->cb(NULL, t->arg);
	then_free(t);
}

/* Reads argv (a command on one key) and calls then with its reply. */
static int then_read(struct then_ctx *t, hub_redis_cb then, int argc, const char **argv)
{
	if (hub_redis_command_argv(t->E->hub->redis, then, t, argc, argv, NULL)) {
		then_free(t);
		return -1;
	}
	return 0;
}

int cmd_create(struct hub *hub, const struct cmd_spec *sp, hub_redis_cb cb, void *arg)
{
	struct cmd_engine *E = hub->cmd;
	hub_buf b = { 0 };
	char k[HUB_KEY_IDEM_MAX];
	size_t idem = sp->idem && *sp->idem;

	if (!E)
		return -1;
	call_begin(E, &b, S_CREATE, 5 + 1 + idem, 11, true);
	call_group(&b, sp->id, sp->device);
	call_key(&b, k, hub_key_dev_cmdlog(k, sizeof(k), sp->device));
	if (idem)
		call_key(&b, k, hub_key_idem(k, sizeof(k), sp->device, sp->owner ? sp->owner : "",
					     sp->idem));
	call_now(&b);
	call_arg(&b, sp->id);
	call_arg(&b, sp->device);
	call_arg(&b, sp->type);
	call_arg(&b, sp->name);
	call_arg(&b, sp->params);
	hub_resp_int(&b, sp->ack_timeout_s);
	hub_resp_int(&b, sp->timeout_s);
	hub_resp_int(&b, sp->ttl_s);
	hub_resp_int(&b, sp->max_attempts);
	call_arg(&b, sp->owner ? sp->owner : "");
	call_arg(&b, sp->rollout ? sp->rollout : "");
	return call_send(E, &b, cb, arg);
}

static void on_cancel_device(redisReply *r, void *arg)
{
	struct then_ctx *t = arg;
	struct cmd_engine *E = t->E;
	const char *dev = device_of(r);
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	if (!dev) {
		then_fail(t, r);
		return;
	}
	call_begin(E, &b, S_CANCEL, group_len(dev) + (*dev ? 1 : 0), 2, true);
	call_group(&b, t->name, dev);
	if (*dev)
		call_key(&b, k, hub_key_dev_cancels(k, sizeof(k), dev));
	call_now(&b);
	call_arg(&b, t->name);
	call_arg(&b, dev);
	then_send(t, &b);
}

int cmd_cancel(struct hub *hub, const char *id, hub_redis_cb cb, void *arg)
{
	struct cmd_engine *E = hub->cmd;
	struct then_ctx *t;

	if (!E)
		return -1;
	t = then_new(E, cb, arg, id);
	if (read_device(E, id, on_cancel_device, t)) {
		then_free(t);
		return -1;
	}
	return 0;
}

int cmd_get(struct hub *hub, const char *id, hub_redis_cb cb, void *arg)
{
	struct cmd_engine *E = hub->cmd;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	if (!E)
		return -1;
	call_begin(E, &b, S_GET, 2, 0, false);
	call_key(&b, k, hub_key_cmd(k, sizeof(k), id));
	call_key(&b, k, hub_key_cmd_log(k, sizeof(k), id));
	return call_send(E, &b, cb, arg);
}

/* The device's command ids were read, newest first: the list script. */
static void on_list_ids(redisReply *r, void *arg)
{
	struct then_ctx *t = arg;
	struct cmd_engine *E = t->E;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	if (!r || r->type != REDIS_REPLY_ARRAY) {
		then_fail(t, r);
		return;
	}
	call_begin(E, &b, S_LIST, r->elements, 2, false);
	for (size_t i = 0; i < r->elements; i++)
		call_key(&b, k, hub_key_cmd(k, sizeof(k), el_or_empty(r, i)));
	hub_buf_append(&b, t->args.data, t->args.len);
	then_send(t, &b);
}

int cmd_list(struct hub *hub, const char *device, const char *status, int limit,
	     hub_redis_cb cb, void *arg)
{
	struct cmd_engine *E = hub->cmd;
	struct then_ctx *t;
	char key[HUB_KEY_MAX];
	const char *argv[4] = { "ZREVRANGE", key, "0", "-1" };

	if (!E)
		return -1;
	if (!hub_key_dev_cmdlog(key, sizeof(key), device))
		return -1;
	t = then_new(E, cb, arg, device);
	call_arg(&t->args, status ? status : "");
	hub_resp_int(&t->args, limit);
	return then_read(t, on_list_ids, 4, argv);
}

/* ---- start and stop -------------------------------------------------------- */

void cmd_init(struct hub *hub)
{
	static const char *const lua[S__COUNT] = {
		[S_CREATE] = hub_lua_cmd_create, [S_SEND] = hub_lua_cmd_send,
		[S_ACK] = hub_lua_cmd_ack, [S_CANCEL] = hub_lua_cmd_cancel,
		[S_TICK] = hub_lua_cmd_tick, [S_GET] = hub_lua_cmd_get,
		[S_LIST] = hub_lua_cmd_list, [S_RCREATE] = hub_lua_rollout_create,
		[S_RSTEP] = hub_lua_rollout_step, [S_RGET] = hub_lua_rollout_get,
		[S_OWED] = hub_lua_cmd_owed, [S_DEVICES] = hub_lua_cmd_devices,
		[S_RADD] = hub_lua_rollout_add, [S_RSTATE] = hub_lua_rollout_state,
		[S_RONE] = hub_lua_rollout_one,
		[S_DUE] = hub_lua_cmd_due, [S_RCTL] = hub_lua_rollout_ctl,
	};
	struct cmd_engine *E = hub_xcalloc(1, sizeof(*E));

	E->hub = hub;
	E->armed_at = INT64_MAX;
	for (int i = 0; i < S__COUNT; i++)
		E->scripts[i] = hub_redis_add_script(hub->redis, lua[i]);
	hub->cmd = E;
	hub_ch_ctl_cmd(E->ctl_channel, sizeof(E->ctl_channel), hub->instance_id);
	hub_redis_subscribe(hub->redis, E->ctl_channel, on_ctl, E);
	E->ctl = hub_redis_schannel_get(hub->redis, E->ctl_channel, on_ctl, NULL, E);
	lws_sul_schedule(hub->ctx, 0, &E->sul_sweep, sweep_cb, SWEEP_US);
}

void cmd_stop(struct hub *hub)
{
	struct cmd_engine *E = hub->cmd;

	if (!E)
		return;
	E->stopped = true;
	lws_sul_cancel(&E->sul_sweep);
	lws_sul_cancel(&E->sul_timer);
}

void cmd_free(struct hub *hub)
{
	struct cmd_engine *E = hub->cmd;

	if (!E)
		return;
	free(E->heap);
	free(E->due);
	free(E);
	hub->cmd = NULL;
}

/* Rollout arguments (ARGV[3..16] of hub/lua/rollout_create.lua). */
#define RCREATE_ARGS 15

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The command id of candidate i (in device order) of rollout rid:
 * c_<20 hex of the rollout id><i, 8 hex><4 hex>, the last 4 drawn so that
 * the id is in the device's slot (hub_slot_fit_id); when no 4 digits do,
 * the 20 are taken further along the rollout id's bits. Deterministic: the
 * same rollout and candidate always give the same id. */
static void rollout_cmd_id(char out[HUB_KEY_MAX], const char *rid, size_t i, const char *dev)
{
	const char *hex = strlen(rid) >= 34 ? rid + 2 : "00000000000000000000000000000000";

	for (unsigned shift = 0;; shift++) {
		snprintf(out, HUB_KEY_MAX, "c_%.*s%.*s%08zx0000", 20 - (int)(shift % 12), hex + shift % 12,
			 (int)(shift % 12), "000000000000", i & 0xffffffffu);
		if (hub_slot_fit_id(out, 34, hub_dev_slot(dev)) || shift > 64)
			return;
	}
}

/* The device type's devices were read (every slot's index): sorted, they
 * are the candidates. */
static void rollout_create_split(struct then_ctx *t, char **devs, size_t n);

static void rollout_devices(struct then_ctx *t, char **devs, size_t n)
{
	struct cmd_engine *E = t->E;
	const char *rid = t->name;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX], id[HUB_KEY_MAX];

	qsort(devs, n, sizeof(*devs), cmp_str);
	if (hub_redis_split(E->hub->redis)) {
		rollout_create_split(t, devs, n);
		return;
	}
	call_begin(E, &b, S_RCREATE, 3 + 4 * n, RCREATE_ARGS + 2 * n, true);
	call_key(&b, k, hub_key_rollout(k, sizeof(k), rid));
	call_key(&b, k, hub_key_rollout_cmds(k, sizeof(k), rid));
	call_key(&b, HUB_KEY_ROLLOUTS_ACTIVE, sizeof(HUB_KEY_ROLLOUTS_ACTIVE) - 1);
	for (size_t i = 0; i < n; i++) {
		rollout_cmd_id(id, rid, i, devs[i]);
		call_key(&b, k, hub_key_dev(k, sizeof(k), devs[i]));
		call_key(&b, k, hub_key_dev_cmdlog(k, sizeof(k), devs[i]));
		call_key(&b, k, hub_key_cmd(k, sizeof(k), id));
		call_key(&b, k, hub_key_cmd_log(k, sizeof(k), id));
	}
	call_now(&b);
	hub_buf_append(&b, t->args.data, t->args.len);
	for (size_t i = 0; i < n; i++) {
		rollout_cmd_id(id, rid, i, devs[i]);
		call_arg(&b, devs[i]);
		call_arg(&b, id);
	}
	then_send(t, &b);
}

/* The walk over the type's slot-local indexes: the slot directory, then
 * SMEMBERS of iot:idx:{<tag>}:type:<type> of every marked slot. */
struct rwalk {
	struct then_ctx *t;
	char type[HUB_ID_MAX + 1];
	size_t inflight;
	bool failed;
	char **devs;
	size_t n, cap;
};

static void rwalk_done(struct rwalk *w)
{
	if (w->failed)
		then_fail(w->t, NULL);
	else
		rollout_devices(w->t, w->devs, w->n);
	for (size_t i = 0; i < w->n; i++)
		free(w->devs[i]);
	free(w->devs);
	free(w);
}

static void on_rwalk_members(redisReply *r, void *arg)
{
	struct rwalk *w = arg;

	if (!r || r->type != REDIS_REPLY_ARRAY)
		w->failed = true;
	for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
		if (r->element[i]->type != REDIS_REPLY_STRING)
			continue;
		if (w->n == w->cap) {
			w->cap = w->cap ? 2 * w->cap : 64;
			w->devs = hub_xrealloc(w->devs, w->cap * sizeof(*w->devs));
		}
		w->devs[w->n++] = hub_xstrdup(r->element[i]->str);
	}
	if (!--w->inflight)
		rwalk_done(w);
}

static void on_rwalk_slots(redisReply *r, void *arg)
{
	struct rwalk *w = arg;

	if (!r || (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_NIL)) {
		w->failed = true;
		rwalk_done(w);
		return;
	}
	w->inflight = 1; /* held while the reads are sent */
	/* On one Redis up to UNION_KEYS slots' sets per SUNION; where calls
	 * keep to one slot, one SMEMBERS per slot. */
	size_t per = hub_redis_split(w->t->E->hub->redis) ? 1 : UNION_KEYS;
	char (*keys)[HUB_KEY_MAX] = hub_xmalloc(per * sizeof(*keys));
	const char **argv = hub_xmalloc((1 + per) * sizeof(*argv));
	size_t n = 0;

	argv[0] = per == 1 ? "SMEMBERS" : "SUNION";
	for (unsigned s = 0; r->type == REDIS_REPLY_STRING && s <= HUB_SLOTS; s++) {
		if (s < HUB_SLOTS) {
			if (s / 8 >= r->len || !(((unsigned char)r->str[s / 8]) & (0x80u >> (s % 8))))
				continue;
			hub_key_idx_type(keys[n], HUB_KEY_MAX, s, w->type);
			argv[1 + n] = keys[n];
			n++;
		}
		if (!n || (n < per && s < HUB_SLOTS))
			continue;
		if (hub_redis_command_argv(w->t->E->hub->redis, on_rwalk_members, w, 1 + (int)n,
					   argv, NULL)) {
			w->failed = true;
			break;
		}
		w->inflight++;
		n = 0;
	}
	free(argv);
	free(keys);
	if (!--w->inflight)
		rwalk_done(w);
}

int cmd_rollout_create(struct hub *hub, const struct cmd_spec *sp, const char *labels,
		       const char *patterns, int max_per_minute, double ratio, int min_finished,
		       bool online_only, hub_redis_cb cb, void *arg)
{
	struct cmd_engine *E = hub->cmd;
	struct then_ctx *t;
	struct rwalk *w;
	char num[32];
	const char *argv[2] = { "GET", HUB_KEY_SLOTS };

	if (!E)
		return -1;
	if (!hub_id_valid(sp->type, strlen(sp->type)))
		return -1;
	t = then_new(E, cb, arg, sp->id);
	call_arg(&t->args, sp->id);
	call_arg(&t->args, sp->type);
	call_arg(&t->args, labels ? labels : "");
	call_arg(&t->args, patterns ? patterns : "");
	call_arg(&t->args, sp->name);
	call_arg(&t->args, sp->params);
	hub_resp_int(&t->args, sp->ack_timeout_s);
	hub_resp_int(&t->args, sp->timeout_s);
	hub_resp_int(&t->args, sp->ttl_s);
	hub_resp_int(&t->args, sp->max_attempts);
	hub_resp_int(&t->args, max_per_minute);
	snprintf(num, sizeof(num), "%.6f", ratio);
	call_arg(&t->args, num);
	call_arg(&t->args, sp->owner ? sp->owner : "");
	hub_resp_int(&t->args, min_finished);
	call_arg(&t->args, online_only ? "1" : "0");
	w = hub_xcalloc(1, sizeof(*w));
	w->t = t;
	snprintf(w->type, sizeof(w->type), "%s", sp->type);
	if (hub_redis_command_argv(E->hub->redis, on_rwalk_slots, w, 2, argv, NULL)) {
		then_free(t);
		free(w);
		return -1;
	}
	return 0;
}

/* The rollout's command ids were read: the counts of their statuses. */
static void on_rollout_ids(redisReply *r, void *arg)
{
	struct then_ctx *t = arg;
	struct cmd_engine *E = t->E;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	if (!r || r->type != REDIS_REPLY_ARRAY) {
		then_fail(t, r);
		return;
	}
	call_begin(E, &b, S_RGET, 1 + r->elements, 0, false);
	call_key(&b, k, hub_key_rollout(k, sizeof(k), t->name));
	for (size_t i = 0; i < r->elements; i++)
		call_key(&b, k, hub_key_cmd(k, sizeof(k), el_or_empty(r, i)));
	then_send(t, &b);
}

int cmd_rollout_ctl(struct hub *hub, const char *id, const char *action, hub_redis_cb cb,
		    void *arg)
{
	struct cmd_engine *E = hub->cmd;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	if (!E || !hub_key_rollout(k, sizeof(k), id))
		return -1;
	call_begin(E, &b, S_RCTL, 1, 2, false);
	call_key(&b, k, strlen(k));
	call_arg(&b, action);
	hub_resp_int(&b, hub_now_ms());
	return call_send(E, &b, cb, arg);
}

/* ---- rollouts where calls keep to one slot (a Redis Cluster) ---------------
 * The rollout's own keys are in the slot of {hub} (its id is drawn there,
 * cmd_new_rollout_id), its commands in their devices' slots, so creation, a
 * release step and a read go in several calls, each safe to repeat or to
 * run on two instances at once (docs/commands.md "Rollouts on a Redis
 * Cluster"): hub/lua/rollout_state.lua for the rollout, rollout_add.lua and
 * rollout_one.lua for its commands. */

#define RADD_BATCH 256           /* candidates per rollout_add call */
#define RCREATE_GRACE_MS "60000" /* `creating` for longer: its creator died */
#define RRELEASE_GRACE_MS 5000   /* released, still held that long after: its step died */

/* The value of field in a flat HGETALL reply, or NULL. */
static const redisReply *hash_field(const redisReply *h, const char *field)
{
	for (size_t i = 0; h && h->type == REDIS_REPLY_ARRAY && i + 1 < h->elements; i += 2)
		if (h->element[i]->type == REDIS_REPLY_STRING && !strcmp(h->element[i]->str, field))
			return h->element[i + 1];
	return NULL;
}

static const char *hash_str(const redisReply *h, const char *field)
{
	const redisReply *v = hash_field(h, field);

	return v && v->type == REDIS_REPLY_STRING ? v->str : "";
}

/* A rollout_state call: its keys (three, two for `read`), then now, action
 * and the rollout id; nargs more ARGV follow (call_arg). */
static void call_state(struct cmd_engine *E, hub_buf *b, const char *action, const char *rid,
		       size_t nargs)
{
	char k[HUB_KEY_MAX];
	bool read = !strcmp(action, "read"); /* any id: without the active set */

	call_begin(E, b, S_RSTATE, read ? 2 : 3, 3 + nargs, false);
	call_key(b, k, hub_key_rollout(k, sizeof(k), rid));
	call_key(b, k, hub_key_rollout_cmds(k, sizeof(k), rid));
	if (!read)
		call_key(b, HUB_KEY_ROLLOUTS_ACTIVE, sizeof(HUB_KEY_ROLLOUTS_ACTIVE) - 1);
	hub_resp_int(b, hub_now_ms());
	call_arg(b, action);
	call_arg(b, rid);
}

static void on_ignore(redisReply *r, void *arg)
{
	(void)r;
	(void)arg;
}

/* -- creation: begin (every candidate's id listed), rollout_add per slot,
 * open (the list becomes the commands created). Interrupted, the rollout
 * stays `creating` and a later step cancels what was created. */
struct rsplit {
	struct then_ctx *t;      /* the caller's cb; name: the rollout id */
	size_t n;
	char **devs;             /* the candidates, sorted */
	char (*ids)[HUB_KEY_MAX];
	struct rpos { unsigned slot; size_t i; } *order; /* by slot, then position */
	bool *matched;
	size_t pending;
	bool failed;
};

struct radd_op {
	struct rsplit *c;
	size_t first, m;         /* c->order[first .. first + m) */
};

static void rsplit_free(struct rsplit *c)
{
	for (size_t i = 0; i < c->n; i++)
		free(c->devs[i]);
	free(c->devs);
	free(c->ids);
	free(c->order);
	free(c->matched);
	free(c);
}

static void rsplit_open(struct rsplit *c)
{
	struct cmd_engine *E = c->t->E;
	hub_buf b = { 0 };
	size_t m = 0;

	if (c->failed) {
		then_fail(c->t, NULL); /* 503; the rollout stays `creating` */
		rsplit_free(c);
		return;
	}
	for (size_t i = 0; i < c->n; i++)
		m += c->matched[i];
	call_state(E, &b, "open", c->t->name, m);
	for (size_t i = 0; i < c->n; i++)
		if (c->matched[i])
			call_arg(&b, c->ids[i]);
	then_send(c->t, &b);
	rsplit_free(c);
}

static void on_radd(redisReply *r, void *arg)
{
	struct radd_op *o = arg;
	struct rsplit *c = o->c;
	size_t j = 0;

	if (!r || r->type != REDIS_REPLY_ARRAY) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("rollout %s: rollout_add: %s", c->t->name, r->str);
		c->failed = true;
	}
	/* The reply lists the matching ids in the call's order. */
	for (size_t e = 0; r && r->type == REDIS_REPLY_ARRAY && e < r->elements; e++)
		for (; j < o->m; j++) {
			size_t i = c->order[o->first + j].i;
			if (r->element[e]->type == REDIS_REPLY_STRING &&
			    !strcmp(r->element[e]->str, c->ids[i])) {
				c->matched[i] = true;
				j++;
				break;
			}
		}
	free(o);
	if (!--c->pending)
		rsplit_open(c);
}

static int cmp_slot_pos(const void *a, const void *b)
{
	const struct rpos *x = a, *y = b;

	if (x->slot != y->slot)
		return x->slot < y->slot ? -1 : 1;
	return x->i < y->i ? -1 : x->i > y->i;
}

static void rsplit_add(struct rsplit *c, size_t first, size_t m)
{
	struct cmd_engine *E = c->t->E;
	struct radd_op *o = hub_xcalloc(1, sizeof(*o));
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	o->c = c;
	o->first = first;
	o->m = m;
	call_begin(E, &b, S_RADD, 4 * m, RCREATE_ARGS + 2 * m, true);
	for (size_t j = 0; j < m; j++) {
		size_t i = c->order[first + j].i;
		call_key(&b, k, hub_key_dev(k, sizeof(k), c->devs[i]));
		call_key(&b, k, hub_key_dev_cmdlog(k, sizeof(k), c->devs[i]));
		call_key(&b, k, hub_key_cmd(k, sizeof(k), c->ids[i]));
		call_key(&b, k, hub_key_cmd_log(k, sizeof(k), c->ids[i]));
	}
	call_now(&b);
	hub_buf_append(&b, c->t->args.data, c->t->args.len);
	for (size_t j = 0; j < m; j++) {
		size_t i = c->order[first + j].i;
		call_arg(&b, c->devs[i]);
		call_arg(&b, c->ids[i]);
	}
	c->pending++;
	if (call_send(E, &b, on_radd, o)) {
		c->pending--;
		c->failed = true;
		free(o);
	}
}

static void on_rsplit_begun(redisReply *r, void *arg)
{
	struct rsplit *c = arg;
	size_t first = 0;

	if (!r || r->type != REDIS_REPLY_INTEGER) {
		then_fail(c->t, r);
		rsplit_free(c);
		return;
	}
	c->pending = 1; /* held while the calls are sent */
	for (size_t j = 1; j <= c->n; j++)
		if (j == c->n || j - first == RADD_BATCH || c->order[j].slot != c->order[first].slot) {
			rsplit_add(c, first, j - first);
			first = j;
		}
	if (!--c->pending)
		rsplit_open(c);
}

static void rollout_create_split(struct then_ctx *t, char **devs, size_t n)
{
	struct cmd_engine *E = t->E;
	struct rsplit *c = hub_xcalloc(1, sizeof(*c));
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	c->t = t;
	c->n = n;
	c->devs = hub_xcalloc(n ? n : 1, sizeof(*c->devs));
	c->ids = hub_xcalloc(n ? n : 1, sizeof(*c->ids));
	c->order = hub_xcalloc(n ? n : 1, sizeof(*c->order));
	c->matched = hub_xcalloc(n ? n : 1, sizeof(*c->matched));
	for (size_t i = 0; i < n; i++) {
		c->devs[i] = hub_xstrdup(devs[i]);
		rollout_cmd_id(c->ids[i], t->name, i, devs[i]);
		c->order[i].slot = hub_dev_slot(devs[i]);
		c->order[i].i = i;
	}
	qsort(c->order, n, sizeof(*c->order), cmp_slot_pos);
	call_begin(E, &b, S_RSTATE, 3, 2 + RCREATE_ARGS + n, false);
	call_key(&b, k, hub_key_rollout(k, sizeof(k), t->name));
	call_key(&b, k, hub_key_rollout_cmds(k, sizeof(k), t->name));
	call_key(&b, HUB_KEY_ROLLOUTS_ACTIVE, sizeof(HUB_KEY_ROLLOUTS_ACTIVE) - 1);
	hub_resp_int(&b, hub_now_ms());
	call_arg(&b, "begin");
	hub_buf_append(&b, t->args.data, t->args.len); /* ARGV[3..17] */
	for (size_t i = 0; i < n; i++)
		call_arg(&b, c->ids[i]);
	if (call_send(E, &b, on_rsplit_begun, c)) {
		then_fail(t, NULL);
		rsplit_free(c);
	}
}

/* -- a release step: read the rollout and its commands' states, then what
 * rollout_step decides, command by command (rollout_one) and on the
 * rollout (rollout_state advance / finish). */
struct rcmd {
	char *id, *dev;          /* dev NULL: the command is gone */
	char status[16];
	bool held;
};

struct rstep {
	struct cmd_engine *E;
	char rid[CMD_ID_MAX + 1];
	char status[16];
	long long released, min_finished;
	double ratio;
	bool online_only;
	size_t n, pending;
	bool failed;
	struct rcmd *cmd;
	const char *fin_from, *fin_to; /* the finish once the cancels are done */
	size_t next, upto;       /* the releases of this step */
	int64_t updated_at;
};

struct rcmd_op {
	struct rstep *s;
	size_t i;
};

static void rstep_free(struct rstep *s)
{
	for (size_t i = 0; i < s->n; i++) {
		free(s->cmd[i].id);
		free(s->cmd[i].dev);
	}
	free(s->cmd);
	free(s);
}

/* A rollout_state call with up to two more arguments: 0, or -1 (Redis is
 * down: cb is not called). */
static int rstep_state(struct rstep *s, const char *action, const char *a4, const char *a5,
		       hub_redis_cb cb, void *arg)
{
	hub_buf b = { 0 };

	call_state(s->E, &b, action, s->rid, (a4 != NULL) + (a5 != NULL));
	if (a4)
		call_arg(&b, a4);
	if (a5)
		call_arg(&b, a5);
	return call_send(s->E, &b, cb, arg);
}

static bool rcmd_held(const struct rcmd *c)
{
	return c->dev && c->held && !strcmp(c->status, "queued");
}

/* A rollout_one call for command i (action release or cancel). */
static int rstep_one(struct rstep *s, size_t i, const char *action, const char *why,
		     hub_redis_cb cb, void *arg)
{
	hub_buf b = { 0 };

	call_begin(s->E, &b, S_RONE, 5, 4, true);
	call_group(&b, s->cmd[i].id, s->cmd[i].dev);
	call_now(&b);
	call_arg(&b, s->rid);
	call_arg(&b, action);
	call_arg(&b, s->online_only ? "1" : "0");
	call_arg(&b, why);
	return call_send(s->E, &b, cb, arg);
}

/* One cancel less to wait for; after the last, the finish (unless one
 * failed: the next step cancels again). */
static void rstep_cancel_done(struct rstep *s)
{
	if (--s->pending)
		return;
	if (!s->failed)
		rstep_state(s, "finish", s->fin_from, s->fin_to, on_ignore, NULL);
	rstep_free(s);
}

static void on_rstep_canceled(redisReply *r, void *arg)
{
	struct rstep *s = arg;

	if (!r || r->type == REDIS_REPLY_ERROR)
		s->failed = true;
	rstep_cancel_done(s);
}

/* The commands not yet released are canceled, then the rollout goes from
 * `from` to `to`. Frees s. */
static void rstep_cancel_rest(struct rstep *s, const char *why, const char *from, const char *to)
{
	s->fin_from = from;
	s->fin_to = to;
	s->pending = 1; /* held while the calls are sent */
	for (size_t i = (size_t)s->released; i < s->n; i++)
		if (rcmd_held(&s->cmd[i])) {
			if (rstep_one(s, i, "cancel", why, on_rstep_canceled, s))
				s->failed = true;
			else
				s->pending++;
		}
	rstep_cancel_done(s);
}

/* Releases the due commands s->next .. s->upto - 1 one after the other
 * (devices get them in the rollout's order, as on one Redis). Frees s at
 * the end. */
static void rstep_release_next(struct rstep *s);

static void on_rstep_released(redisReply *r, void *arg)
{
	struct rstep *s = arg;

	on_step(r, s->E);
	if (!r)
		s->next = s->upto; /* Redis went down: a later step goes on */
	rstep_release_next(s);
}

static void rstep_release_next(struct rstep *s)
{
	while (s->next < s->upto) {
		size_t i = s->next++;
		if (rcmd_held(&s->cmd[i]) &&
		    !rstep_one(s, i, "release", "", on_rstep_released, s))
			return;
	}
	rstep_free(s);
}

static void on_rstep_advanced(redisReply *r, void *arg)
{
	struct rstep *s = arg;

	if (el_int(r, 0) == 1 && el_int(r, 1) >= 0 && el_int(r, 2) <= (long long)s->n) {
		s->next = (size_t)el_int(r, 1);
		s->upto = (size_t)el_int(r, 2);
	}
	rstep_release_next(s);
}

/* Every command's state is known: what rollout_step would do. */
static void rstep_decide(struct rstep *s)
{
	size_t finished = 0, fails = 0, open = 0;

	if (s->failed) {
		rstep_free(s); /* the next sweep steps it */
		return;
	}
	if (!strcmp(s->status, "canceling")) {
		rstep_cancel_rest(s, "rollout canceled", "canceling", "canceled");
		return;
	}
	for (size_t i = 0; i < s->n; i++) {
		bool final = s->cmd[i].dev && cmd_state_final(s->cmd[i].status);
		if (!s->cmd[i].dev)
			continue; /* gone: final */
		if (!final)
			open++;
		else if (i < (size_t)s->released && strcmp(s->cmd[i].status, "canceled")) {
			finished++;
			fails += strcmp(s->cmd[i].status, "succeeded") != 0;
		}
	}
	if ((long long)finished >= s->min_finished && finished > 0 &&
	    (double)fails / (double)finished > s->ratio) {
		rstep_cancel_rest(s, "rollout aborted: failure ratio crossed", "running", "aborted");
		return;
	}
	if (!open) {
		rstep_state(s, "finish", "running", "completed", on_ignore, NULL);
		rstep_free(s);
		return;
	}
	/* Released but still held a while after the last advance: the step
	 * that advanced died before it released them. */
	if (hub_now_ms() - s->updated_at > RRELEASE_GRACE_MS)
		for (size_t i = 0; i < (size_t)s->released && i < s->n; i++)
			if (rcmd_held(&s->cmd[i]))
				rstep_one(s, i, "release", "", on_step, s->E);
	if (rstep_state(s, "advance", NULL, NULL, on_rstep_advanced, s))
		rstep_free(s);
}

static void on_rstep_cmd(redisReply *r, void *arg)
{
	struct rcmd_op *o = arg;
	struct rstep *s = o->s;
	struct rcmd *c = &s->cmd[o->i];

	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 3)
		s->failed = true;
	else if (r->element[0]->type == REDIS_REPLY_STRING) {
		c->dev = hub_xstrdup(r->element[0]->str);
		snprintf(c->status, sizeof(c->status), "%s", el_or_empty(r, 1));
		c->held = !strcmp(el_or_empty(r, 2), "1");
	}
	free(o);
	if (!--s->pending)
		rstep_decide(s);
}

static void on_rstep_read(redisReply *r, void *arg)
{
	struct rstep *s = arg;
	const redisReply *h, *ids;

	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
	    (h = r->element[0])->type != REDIS_REPLY_ARRAY ||
	    (ids = r->element[1])->type != REDIS_REPLY_ARRAY) {
		rstep_free(s);
		return;
	}
	snprintf(s->status, sizeof(s->status), "%s", hash_str(h, "status"));
	if (!strcmp(s->status, "creating")) {
		rstep_state(s, "stale", RCREATE_GRACE_MS, NULL, on_ignore, NULL);
		rstep_free(s);
		return;
	}
	if (strcmp(s->status, "running") && strcmp(s->status, "canceling")) {
		if (strcmp(s->status, "paused"))
			rstep_state(s, "drop", NULL, NULL, on_ignore, NULL);
		rstep_free(s);
		return;
	}
	s->released = strtoll(hash_str(h, "released"), NULL, 10);
	s->updated_at = strtoll(hash_str(h, "updated_at"), NULL, 10);
	s->min_finished = strtoll(hash_str(h, "min_finished"), NULL, 10);
	s->ratio = strtod(hash_str(h, "abort_failure_ratio"), NULL);
	s->online_only = !strcmp(hash_str(h, "online_only"), "1");
	s->n = ids->elements;
	s->cmd = hub_xcalloc(s->n ? s->n : 1, sizeof(*s->cmd));
	s->pending = 1; /* held while the reads are sent */
	for (size_t i = 0; i < s->n; i++) {
		char key[HUB_KEY_MAX];
		const char *argv[5] = { "HMGET", key, "device", "status", "held" };
		struct rcmd_op *o;

		s->cmd[i].id = hub_xstrdup(el_or_empty(ids, i));
		if (!hub_key_cmd(key, sizeof(key), s->cmd[i].id))
			continue;
		o = hub_xcalloc(1, sizeof(*o));
		o->s = s;
		o->i = i;
		if (hub_redis_command_argv(s->E->hub->redis, on_rstep_cmd, o, 5, argv, NULL)) {
			free(o);
			s->failed = true;
			break;
		}
		s->pending++;
	}
	if (!--s->pending)
		rstep_decide(s);
}

static void rollout_step_split(struct cmd_engine *E, const char *rid)
{
	struct rstep *s = hub_xcalloc(1, sizeof(*s));

	s->E = E;
	snprintf(s->rid, sizeof(s->rid), "%s", rid);
	if (rstep_state(s, "read", NULL, NULL, on_rstep_read, s))
		rstep_free(s);
}

/* -- a read: the rollout, its commands' states counted here, then
 * rollout_get with the counts. */
struct rget {
	struct then_ctx *t;
	size_t pending;
	bool failed;
	size_t nst;
	struct { char name[16]; long long n; } st[16];
};

static void rget_done(struct rget *g)
{
	struct cmd_engine *E = g->t->E;
	hub_buf b = { 0 };
	char k[HUB_KEY_MAX];

	if (g->failed) {
		then_fail(g->t, NULL);
		free(g);
		return;
	}
	call_begin(E, &b, S_RGET, 1, 2 * g->nst, false);
	call_key(&b, k, hub_key_rollout(k, sizeof(k), g->t->name));
	for (size_t i = 0; i < g->nst; i++) {
		call_arg(&b, g->st[i].name);
		hub_resp_int(&b, g->st[i].n);
	}
	then_send(g->t, &b);
	free(g);
}

static void on_rget_status(redisReply *r, void *arg)
{
	struct rget *g = arg;
	const char *st = r && r->type == REDIS_REPLY_STRING ? r->str : "unknown";
	size_t i;

	if (!r || r->type == REDIS_REPLY_ERROR)
		g->failed = true;
	for (i = 0; i < g->nst && strcmp(g->st[i].name, st); i++)
		;
	if (i == g->nst && i < sizeof(g->st) / sizeof(g->st[0])) {
		snprintf(g->st[i].name, sizeof(g->st[i].name), "%s", st);
		g->nst++;
	}
	if (i < g->nst)
		g->st[i].n++;
	if (!--g->pending)
		rget_done(g);
}

static void on_rget_read(redisReply *r, void *arg)
{
	struct rget *g = arg;
	const redisReply *ids;

	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
	    (ids = r->element[1])->type != REDIS_REPLY_ARRAY) {
		then_fail(g->t, r);
		free(g);
		return;
	}
	g->pending = 1; /* held while the reads are sent */
	for (size_t i = 0; i < ids->elements; i++) {
		char key[HUB_KEY_MAX];
		const char *argv[3] = { "HGET", key, "status" };

		if (!hub_key_cmd(key, sizeof(key), el_or_empty(ids, i)))
			continue;
		if (hub_redis_command_argv(g->t->E->hub->redis, on_rget_status, g, 3, argv, NULL)) {
			g->failed = true;
			break;
		}
		g->pending++;
	}
	if (!--g->pending)
		rget_done(g);
}

static int rollout_get_split(struct cmd_engine *E, const char *id, hub_redis_cb cb, void *arg)
{
	struct rget *g = hub_xcalloc(1, sizeof(*g));
	hub_buf b = { 0 };

	g->t = then_new(E, cb, arg, id);
	call_state(E, &b, "read", id, 0);
	if (call_send(E, &b, on_rget_read, g)) {
		then_free(g->t);
		free(g);
		return -1;
	}
	return 0;
}

int cmd_rollout_get(struct hub *hub, const char *id, hub_redis_cb cb, void *arg)
{
	struct cmd_engine *E = hub->cmd;
	char key[HUB_KEY_MAX];
	const char *argv[4] = { "LRANGE", key, "0", "-1" };

	if (!E)
		return -1;
	if (!hub_key_rollout_cmds(key, sizeof(key), id))
		return -1;
	if (hub_redis_split(hub->redis))
		return rollout_get_split(E, id, cb, arg);
	return then_read(then_new(E, cb, arg, id), on_rollout_ids, 4, argv);
}

void cmd_rollout_kick(struct hub *hub, const char *id)
{
	if (hub->cmd)
		rollout_step(hub->cmd, id);
}

/* ---- the module ---------------------------------------------------------- */

static int cmd_module_start(struct hub *hub, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	cmd_init(hub);
	hub_observe(hub, HUB_EV_DEVICES_ANNOUNCED, on_announced, NULL);
	hub_observe(hub, HUB_EV_COMMAND_ACK, on_ack, NULL);
	return 0;
}

const struct hub_module cmd_module = {
	.name = "commands",
	.start = cmd_module_start,
	.stop = cmd_stop,
	.free = cmd_free,
};
