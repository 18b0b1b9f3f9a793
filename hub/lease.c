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
#include "hub/util.h"
#include "hub/module.h"

#define REAP_BATCH "500"       /* devices marked offline per reap script call */
#define EPOCH_HEX  16

/* Redis's clock in ms, in every script: leases are compared on one clock,
 * whatever the hub hosts' clocks say. */
#define LUA_NOW \
	"local t = redis.call('TIME')\n" \
	"local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

/* ARGV = mode, instance, run id, ttl ms, first, epoch candidate.
 * mode `renew`: the epoch (set to the candidate when absent, and then the
 * layout version too: this connection passed the layout check, so a missing
 * one was flushed under the running hubs), then this
 * run's lease renewed to now + ttl. On the first renewal of a process
 * (first = 1) the leases of earlier runs of the same instance id end now:
 * the instance was restarted, they are dead.
 * -> {epoch, had a lease 1|0, it had expired 1|0, expired leases}
 * mode `release`: the lease goes (kept, expired, while the run's set still
 * holds devices, so that a reaper marks them offline). -> 1 */
static const char lease_lua[] = HUB_LUA_KRUN HUB_LUA_FIXED LUA_NOW
	"local inst, me = ARGV[2], ARGV[3]\n"
	"if ARGV[1] == 'release' then\n"
	"  if redis.call('EXISTS', krun(me)) == 0 then redis.call('ZREM', K_LEASES, me)\n"
	"  else redis.call('ZADD', K_LEASES, 'XX', 0, me) end\n"
	"  return 1\n"
	"end\n"
	"local ep = redis.call('GET', K_EPOCH)\n"
	"if not ep then\n"
	"  ep = ARGV[6]\n"
	"  redis.call('SET', K_EPOCH, ep)\n"
	"  redis.call('SET', '" HUB_LAYOUT_KEY "', '" HUB_LAYOUT_VERSION "', 'NX')\n"
	"end\n"
	"local had = redis.call('ZSCORE', K_LEASES, me)\n"
	"if ARGV[5] == '1' then\n"
	"  local pre = inst .. ':'\n"
	"  for _, m in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do\n"
	"    if m ~= me and #m == #me and string.sub(m, 1, #pre) == pre then\n"
	"      redis.call('ZADD', K_LEASES, 0, m)\n"
	"    end\n"
	"  end\n"
	"end\n"
	"redis.call('ZADD', K_LEASES, now + tonumber(ARGV[4]), me)\n"
	"local expired = 0\n"
	"if had and tonumber(had) < now then expired = 1 end\n"
	"return {ep, had and 1 or 0, expired, redis.call('ZCOUNT', K_LEASES, '-inf', '(' .. now)}\n";

/* ARGV = run id of the caller, claim ms, batch. Takes one expired lease
 * that no other live run is reaping (claim: <run set>:reaper, for claim ms,
 * renewed with every batch: a reaper that dies is replaced), pops up to
 * batch devices from the dead run's set and marks offline those the dead
 * run still owns (conn "<run id>:<serial>", online), publishing the offline
 * script's presence event for them. last_seen stays what the dead run last
 * flushed. When the set is empty the lease and the claim go.
 * -> {0} nothing to reap | {1, dead run id, devices marked offline, more 1|0} */
static const char reap_lua[] = HUB_LUA_KDEV HUB_LUA_KRUN HUB_LUA_FIXED LUA_NOW
	"local me, batch = ARGV[1], tonumber(ARGV[3])\n"
	"local dead = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', '(' .. now, 'LIMIT', 0, 16)\n"
	"for _, r in ipairs(dead) do\n"
	"  local ck = kreaper(r)\n"
	"  local who = redis.call('GET', ck)\n"
	"  if r ~= me and (not who or who == me) and runof(r .. ':0') == r then\n"
	"    redis.call('SET', ck, me, 'PX', ARGV[2])\n"
	"    local set, pre, ev = krun(r), r .. ':', {}\n"
	"    for _, dev in ipairs(redis.call('SPOP', set, batch)) do\n"
	"      local key = kdev(dev)\n"
	"      local h = redis.call('HMGET', key, 'conn', 'online', 'type', 'labels', 'gateway')\n"
	"      if h[2] == '1' and h[1] and string.sub(h[1], 1, #pre) == pre then\n"
	"        redis.call('HSET', key, 'online', '0')\n"
	"        ev[#ev + 1] = dev .. '\\t' .. (h[3] or '') .. '\\t' .. (h[4] or '{}') ..\n"
	"          '\\t\"device\":\"' .. dev .. '\",\"online\":false,\"at\":' .. now ..\n"
	"          ',\"gateway\":\"' .. (h[5] or '') .. '\",\"device_type\":\"' .. (h[3] or '') .. '\"\\n'\n"
	"      end\n"
	"    end\n"
	"    if #ev > 0 then redis.call('PUBLISH', CH_PRESENCE, '\\n' .. table.concat(ev)) end\n"
	"    if redis.call('EXISTS', set) == 1 then return {1, r, #ev, 1} end\n"
	"    redis.call('ZREM', K_LEASES, r)\n"
	"    redis.call('DEL', ck)\n"
	"    return {1, r, #ev, 0}\n"
	"  end\n"
	"end\n"
	"return {0}\n";

struct hub_lease {
	struct hub *hub;
	int script_lease, script_reap;
	lws_sorted_usec_list_t sul_tick, sul_reap;
	char run_id[HUB_ID_MAX + 20];       /* "<instance>:<run token>" */
	char epoch[EPOCH_HEX + 1];     /* the Redis epoch last seen; "" = none yet */
	bool ever_registered;          /* this process's lease was written once */
	bool renewing, reaping, stopped;
	int64_t ok_since_us;           /* renewed without a gap since; 0 = not */
	uint64_t reconnects;           /* metrics.redis_reconnects_total then */
	char reaping_run[HUB_ID_MAX + 20];
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

static int eval(struct hub_lease *L, int script, hub_redis_cb cb, int argc, const char **argv)
{
	const char *av[12];

	av[0] = "EVALSHA";
	av[1] = hub_redis_script_sha(L->hub->redis, script);
	av[2] = "0";
	for (int i = 0; i < argc; i++)
		av[3 + i] = argv[i];
	return hub_redis_command_argv(L->hub->redis, cb, L, 3 + argc, av, NULL);
}

static void on_reaped(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;
	const char *run = el_str(r, 1);
	long long n = el_int(r, 2);

	L->reaping = false;
	if (el_int(r, 0) != 1 || !run || L->stopped)
		return;
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
	lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1); /* another one? */
}

static void reap(lws_sorted_usec_list_t *sul)
{
	struct hub_lease *L = lws_container_of(sul, struct hub_lease, sul_reap);
	char claim[24];
	const char *argv[3] = { L->run_id, claim, REAP_BATCH };

	if (L->reaping || L->stopped)
		return;
	snprintf(claim, sizeof(claim), "%d", L->hub->cfg.lease_ttl_ms);
	if (!eval(L, L->script_reap, on_reaped, 3, argv))
		L->reaping = true;
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
	if (!ep || had < 0 || expired < 0 || dead < 0) {
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
		reap(&L->sul_reap);
}

static void renew(struct hub_lease *L)
{
	unsigned char raw[EPOCH_HEX / 2];
	char ttl[24], cand[EPOCH_HEX + 1];
	const char *argv[6] = { "renew", L->hub->instance_id, L->run_id, ttl,
				L->ever_registered ? "0" : "1", cand };

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
	if (!eval(L, L->script_lease, on_renewed, 6, argv))
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
	L->script_lease = hub_redis_add_script(hub->redis, lease_lua);
	L->script_reap = hub_redis_add_script(hub->redis, reap_lua);
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
	const char *argv[6] = { "release", hub->instance_id, L ? L->run_id : "", "0", "0", "" };

	if (!L || L->stopped)
		return;
	L->stopped = true;
	lws_sul_cancel(&L->sul_tick);
	lws_sul_cancel(&L->sul_reap);
	if (L->ever_registered && hub_redis_up(hub->redis))
		eval(L, L->script_lease, NULL, 6, argv);
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
