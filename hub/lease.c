#include "hub/lease.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>
#include <openssl/rand.h>

#include "hub/events.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/redis.h"
#include "hub/registry.h"
#include "hub/util.h"
#include "hub/module.h"
#include "hub_lua.h"

#define REAP_BATCH  "500"      /* devices marked offline per reap script call */
#define EPOCH_HEX   16
#define MAX_DEAD    16         /* expired runs named per renewal (lease_renew.lua) */
#define RUN_ID_MAX  (HUB_ID_MAX + 20)

/* The scripts: hub/lua/lease_renew.lua, lease_release.lua, reap.lua. A
 * dead run is reaped in batches, each two calls: SRANDMEMBER of its online
 * set (a device key must be in the script's KEYS, so the script cannot pop
 * it), then reap.lua on those devices. */
struct hub_lease {
	struct hub *hub;
	int script_renew, script_release, script_reap;
	lws_sorted_usec_list_t sul_tick, sul_reap;
	char run_id[RUN_ID_MAX];       /* "<instance>:<run token>" */
	char epoch[EPOCH_HEX + 1];     /* the Redis epoch last seen; "" = none yet */
	bool ever_registered;          /* this process's lease was written once */
	bool renewing, reaping, stopped;
	int64_t ok_since_us;           /* renewed without a gap since; 0 = not */
	uint64_t reconnects;           /* metrics.redis_reconnects_total then */
	char dead[MAX_DEAD][RUN_ID_MAX]; /* expired runs to reap, the last first */
	int ndead;
	char reaping_run[RUN_ID_MAX];
	long long reaped;              /* devices of reaping_run marked offline */
};

static void reap(lws_sorted_usec_list_t *sul);

static const char *el_str(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements ||
	    r->element[i]->type != REDIS_REPLY_STRING)
		return NULL;
	return r->element[i]->str;
}

static long long el_int(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements ||
	    r->element[i]->type != REDIS_REPLY_INTEGER)
		return -1;
	return r->element[i]->integer;
}

#define EVAL_ARGS_MAX 12

/* EVALSHA script with nkeys keys, then argc arguments (at most
 * EVAL_ARGS_MAX in all). */
static int eval(struct hub_lease *L, int script, hub_redis_cb cb, int nkeys,
		const char **keys, int argc, const char **argv)
{
	const char *av[3 + EVAL_ARGS_MAX];
	char nk[8];

	if (nkeys + argc > EVAL_ARGS_MAX)
		abort(); /* a programming error: every call site passes constants */
	snprintf(nk, sizeof(nk), "%d", nkeys);
	av[0] = "EVALSHA";
	av[1] = hub_redis_script_sha(L->hub->redis, script);
	av[2] = nk;
	for (int i = 0; i < nkeys; i++)
		av[3 + i] = keys[i];
	for (int i = 0; i < argc; i++)
		av[3 + nkeys + i] = argv[i];
	return hub_redis_command_argv(L->hub->redis, cb, L, 3 + nkeys + argc, av, NULL);
}

/* The run being reaped is done with (reaped, or not to be reaped by us). */
static void dead_done(struct hub_lease *L, const char *run)
{
	if (L->ndead && !strcmp(L->dead[L->ndead - 1], run))
		L->ndead--;
	lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1); /* the next one */
}

static void on_reaped(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;
	const char *run = el_str(r, 1);
	long long n = el_int(r, 2);

	L->reaping = false;
	if (L->stopped || !L->ndead)
		return;
	if (el_int(r, 0) == 0) {
		dead_done(L, L->dead[L->ndead - 1]); /* live again, or another reaps it */
		return;
	}
	if (el_int(r, 0) != 1 || !run) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("lease: reaping failed: %s", r->str);
		return; /* tried again after the next renewal */
	}
	if (strcmp(run, L->reaping_run)) {
		snprintf(L->reaping_run, sizeof(L->reaping_run), "%s", run);
		L->reaped = 0;
		hub_warn("lease of hub run %s expired: marking its devices offline", run);
	}
	L->reaped += n > 0 ? n : 0;
	if (el_int(r, 3) == 1) {
		/* More of it: the next batch in the next loop turn, so gateways
		 * and other Redis work go in between. */
		lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1);
		return;
	}
	hub_warn("hub run %s reaped: %lld devices marked offline", run, L->reaped);
	L->reaping_run[0] = '\0';
	L->reaped = 0;
	dead_done(L, run);
}

/* A batch of the dead run's devices was read: mark them offline. */
static void on_members(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;
	const char *run = L->ndead ? L->dead[L->ndead - 1] : NULL;
	char key[HUB_KEY_MAX], claim[24];
	hub_buf b = { 0 };
	size_t n;

	L->reaping = false;
	if (L->stopped || !run || !r || r->type != REDIS_REPLY_ARRAY)
		return; /* tried again after the next renewal */
	n = r->elements;
	hub_resp_head(&b, 3 + 3 + n + 4 + n);
	hub_resp_evalsha(&b, L->hub->redis, L->script_reap, 3 + n);
	hub_resp_arg(&b, HUB_KEY_LEASES, sizeof(HUB_KEY_LEASES) - 1);
	hub_resp_arg(&b, key, hub_key_run_reaper(key, sizeof(key), run));
	hub_resp_arg(&b, key, hub_key_run(key, sizeof(key), run));
	for (size_t i = 0; i < n; i++) {
		const redisReply *d = r->element[i];
		hub_resp_arg(&b, key, d->type == REDIS_REPLY_STRING ?
			     hub_key_dev(key, sizeof(key), d->str) : 0);
	}
	hub_resp_str(&b, L->run_id);
	hub_resp_str(&b, run);
	snprintf(claim, sizeof(claim), "%d", L->hub->cfg.lease_ttl_ms);
	hub_resp_str(&b, claim);
	hub_resp_arg(&b, HUB_CH_PRESENCE, sizeof(HUB_CH_PRESENCE) - 1);
	for (size_t i = 0; i < n; i++) {
		const redisReply *d = r->element[i];
		hub_resp_arg(&b, d->type == REDIS_REPLY_STRING ? d->str : "",
			     d->type == REDIS_REPLY_STRING ? d->len : 0);
	}
	if (!hub_redis_command_formatted(L->hub->redis, on_reaped, L, b.data, b.len))
		L->reaping = true;
	hub_buf_free(&b);
}

/* Reaps the last of the expired runs the renewal named: reads a batch of
 * the devices it held online, then on_members marks them offline. */
static void reap(lws_sorted_usec_list_t *sul)
{
	struct hub_lease *L = lws_container_of(sul, struct hub_lease, sul_reap);
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "SRANDMEMBER", key, REAP_BATCH };

	if (L->reaping || L->stopped || !L->ndead)
		return;
	if (!hub_key_run(key, sizeof(key), L->dead[L->ndead - 1])) {
		L->ndead--; /* not a run id: not ours to reap */
		lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1);
		return;
	}
	if (!hub_redis_command_argv(L->hub->redis, on_members, L, 3, argv, NULL))
		L->reaping = true;
}

/* The expired runs the renewal named (oldest first), kept in reverse so
 * that the oldest is reaped first; a run being reaped now stays the one
 * reaped next. */
static void take_dead(struct hub_lease *L, const redisReply *runs)
{
	char cur[RUN_ID_MAX] = "";

	if (L->ndead)
		snprintf(cur, sizeof(cur), "%s", L->dead[L->ndead - 1]);
	L->ndead = 0;
	for (size_t i = runs->type == REDIS_REPLY_ARRAY ? runs->elements : 0;
	     i > 0 && L->ndead < MAX_DEAD; i--) {
		const redisReply *e = runs->element[i - 1];
		if (e->type != REDIS_REPLY_STRING || e->len >= RUN_ID_MAX || !strcmp(e->str, cur) ||
		    !strcmp(e->str, L->run_id))
			continue;
		memcpy(L->dead[L->ndead++], e->str, e->len + 1);
	}
	if (cur[0] && L->ndead < MAX_DEAD)
		snprintf(L->dead[L->ndead++], RUN_ID_MAX, "%s", cur);
	reap(&L->sul_reap);
}

static void on_renewed(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;
	struct hub *hub = L->hub;
	const char *ep = el_str(r, 0);
	long long had = el_int(r, 1), expired = el_int(r, 2), dead = el_int(r, 3);
	int64_t now = hub_mono_us();
	bool rebuild = false;

	L->renewing = false;
	if (L->stopped)
		return;
	if (!ep || had < 0 || expired < 0 || dead < 0 || r->elements < 5) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("lease: renewal failed: %s", r->str);
		L->ok_since_us = 0;
		return;
	}
	if (L->epoch[0] && strcmp(L->epoch, ep)) {
		hub_warn("Redis holds another data generation (" HUB_KEY_EPOCH " %.16s, was %s): "
			 "it restarted empty or was flushed or replaced; re-announcing the devices "
			 "of this hub's connections", ep, L->epoch);
		rebuild = true;
	} else if (L->ever_registered && (!had || expired)) {
		hub_warn("lease: this hub's lease %s in Redis (missed renewals: Redis or the "
			 "hub stalled): re-announcing the devices of its connections",
			 had ? "had expired" : "was gone");
		rebuild = true;
	}
	if (rebuild)
		hub_registry_forget_slots(hub);
	if (L->epoch[0] && strcmp(L->epoch, ep) && !hub_redis_cluster(hub->redis)) {
		/* lease_renew put HUB_LAYOUT_KEY back; on one Redis the layout-2
		 * key goes back too, as the tombstone that keeps a hub of layout 2
		 * off this Redis (layout.lua). A cluster never had one. */
		const char *argv[4] = { "SET", "iot:layout", HUB_LAYOUT_VERSION, "NX" };
		hub_redis_command_argv(hub->redis, NULL, NULL, 4, argv, NULL);
	}
	snprintf(L->epoch, sizeof(L->epoch), "%s", ep);
	L->ever_registered = true;
	/* Reaping waits until this hub has renewed without a gap for a whole
	 * ttl: after an outage of its own, the others need that long to renew
	 * theirs. */
	if (!had || expired || L->reconnects != hub->metrics.redis_reconnects_total ||
	    !L->ok_since_us)
		L->ok_since_us = now;
	L->reconnects = hub->metrics.redis_reconnects_total;
	struct hub_ev_lease ev = { rebuild };
	hub_emit(hub, HUB_EV_LEASE_RENEWED, &ev);
	if (dead > 0 && now - L->ok_since_us >= (int64_t)hub->cfg.lease_ttl_ms * 1000)
		take_dead(L, r->element[4]);
}

static void renew(struct hub_lease *L)
{
	unsigned char raw[EPOCH_HEX / 2];
	char ttl[24], cand[EPOCH_HEX + 1];
	const char *keys[3] = { HUB_KEY_LEASES, HUB_KEY_EPOCH, HUB_LAYOUT_KEY };
	const char *argv[6] = { L->hub->instance_id, L->run_id, ttl,
				L->ever_registered ? "0" : "1", cand, HUB_LAYOUT_VERSION };

	if (L->renewing || L->stopped)
		return;
	if (!hub_redis_up(L->hub->redis)) {
		L->ok_since_us = 0;
		return;
	}
	/* A fresh candidate each time: the same one set again after a second
	 * empty restart would hide that restart. */
	if (RAND_bytes(raw, sizeof(raw)) != 1)
		abort();
	for (size_t i = 0; i < sizeof(raw); i++)
		snprintf(cand + 2 * i, 3, "%02x", raw[i]);
	snprintf(ttl, sizeof(ttl), "%d", L->hub->cfg.lease_ttl_ms);
	if (!eval(L, L->script_renew, on_renewed, 3, keys, 6, argv))
		L->renewing = true;
	else
		L->ok_since_us = 0;
}

static void tick(lws_sorted_usec_list_t *sul)
{
	struct hub_lease *L = lws_container_of(sul, struct hub_lease, sul_tick);

	renew(L);
	lws_sul_schedule(L->hub->ctx, 0, &L->sul_tick, tick,
			 (lws_usec_t)L->hub->cfg.lease_renew_ms * 1000);
}

/* The command connection is (again) up: renew and check the epoch now, and
 * do not reap for a lease-ttl-ms. */
static void on_redis_ready(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	struct hub_lease *L = ctx;

	(void)hub;
	(void)ev;
	(void)payload;
	if (L->stopped)
		return;
	L->ok_since_us = 0;
	/* From the gate's reply callback: the connection counts as up once it
	 * returns, so renew from a timer. */
	lws_sul_schedule(L->hub->ctx, 0, &L->sul_tick, tick, 1);
}

static int lease_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_lease *L = hub_xcalloc(1, sizeof(*L));

	(void)err;
	(void)errlen;
	hub->lease = L;
	L->hub = hub;
	snprintf(L->run_id, sizeof(L->run_id), "%s:%s", hub->instance_id, hub->run_token);
	L->script_renew = hub_redis_add_script(hub->redis, hub_lua_lease_renew);
	L->script_release = hub_redis_add_script(hub->redis, hub_lua_lease_release);
	L->script_reap = hub_redis_add_script(hub->redis, hub_lua_reap);
	hub_observe(hub, HUB_EV_REDIS_READY, on_redis_ready, L);
	lws_sul_schedule(hub->ctx, 0, &L->sul_tick, tick,
			 (lws_usec_t)hub->cfg.lease_renew_ms * 1000);
	return 0;
}

/* Shutdown, after the gateways were drained: gives the lease up (removed
 * when this run holds no device any more, else expired at once for a
 * reaper); the hub lets the loop write it before disconnecting Redis. */
static void lease_stop(struct hub *hub)
{
	struct hub_lease *L = hub->lease;
	char key[HUB_KEY_MAX];
	const char *keys[2] = { HUB_KEY_LEASES, key };
	const char *argv[1] = { L ? L->run_id : "" };

	if (!L || L->stopped)
		return;
	L->stopped = true;
	lws_sul_cancel(&L->sul_tick);
	lws_sul_cancel(&L->sul_reap);
	if (L->ever_registered && hub_redis_up(hub->redis) &&
	    hub_key_run(key, sizeof(key), L->run_id))
		eval(L, L->script_release, NULL, 2, keys, 1, argv);
}

static void lease_free(struct hub *hub)
{
	free(hub->lease);
	hub->lease = NULL;
}

const struct hub_module hub_lease_module = {
	.name = "lease",
	.start = lease_start,
	.stop = lease_stop,
	.free = lease_free,
};
