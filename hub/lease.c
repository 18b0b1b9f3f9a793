#include "hub/lease.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>
#include <hiredis/hiredis.h>
#include <openssl/rand.h>

#include "hub/events.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/rc.h"
#include "hub/redis.h"
#include "hub/registry.h"
#include "hub/util.h"
#include "hub/module.h"
#include "hub_lua.h"

#define REAP_BATCH  500        /* devices marked offline per reap script call */
#define REAP_CHUNK  1024       /* slots' run sets read per SUNION on one Redis */
#define EPOCH_HEX   16
#define MAX_DEAD    16         /* expired runs named per renewal (lease_renew.lua) */
#define RUN_ID_MAX  (HUB_ID_MAX + 20)
#define POLL_US     (100 * 1000) /* the loop takes the renewer's results */
#define STUCK_TTLS  4          /* a loop that has not turned for this many leases is stuck */

/* What one renewal found (the renewer thread's, handed to the loop). */
enum renew_status {
	RENEW_OK,       /* lease_renew answered */
	RENEW_FAILED,   /* no answer: no connection, a timeout, an error reply */
	RENEW_DOWN,     /* not sent: the command connection is down */
	RENEW_STUCK,    /* not sent: the event loop has not turned for STUCK_TTLS leases */
};

struct renew_result {
	enum renew_status status;
	char err[HUB_REDIS_HOST_MAX + 256]; /* RENEW_FAILED: why */
	char epoch[EPOCH_HEX + 1];
	long long had, expired, dead, claimed;
	char runs[MAX_DEAD][RUN_ID_MAX]; /* expired runs, oldest first */
	int nruns;
	int64_t took_us;               /* connect (if it had to) and answer */
};

/* The renewals since the loop last took them, folded (a busy loop may miss
 * several): the last answered one, and what any of them said that the loop
 * must not miss. */
struct renew_batch {
	bool answered;                 /* ok holds the last answered renewal */
	struct renew_result ok;
	bool gone, expired;            /* an answered one found the lease gone, expired */
	bool gap;                      /* one was not answered (or not sent) */
	bool last_ok;                  /* the latest was answered */
	int64_t took_max_us;
	int failed;                    /* RENEW_FAILED among them */
	char err[HUB_REDIS_HOST_MAX + 256]; /* the last failure's why */
};

/* The lease is renewed by a thread of its own, on a blocking connection
 * of its own, so that a busy event loop does not let it expire: in a
 * 100,000-gateway reconnect storm a hub's loop took turns of seconds (its
 * share of a core spread over thousands of connections), and renewals
 * sent from it were answered 2-15 s late, past an 8 s lease, which turned
 * the storm into a cascade of reaps and re-announces. A live but busy hub
 * is not a dead one. A stuck one is: the thread renews only while the loop
 * keeps turning (loop_us, set by the loop's own timer) within STUCK_TTLS
 * leases, and only while the loop says the command connection is up. What
 * a renewal finds (another data generation, an expired lease, dead runs
 * to reap) is acted on by the loop. Everything under mu. */
struct renewer {
	pthread_t tid;
	bool running;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool stop, kick, may_renew;
	int64_t loop_us;
	bool unseen;                   /* batch holds renewals the loop has not taken */
	struct renew_batch batch;
	/* the thread's own */
	struct rc *rc;
	bool registered, stuck_said;
};

/* The scripts: hub/lua/lease_renew.lua, lease_release.lua, reap_claim.lua,
 * reap.lua, reap_done.lua. A dead run is reaped slot by slot: the claim
 * (in the {hub} slot, beside its lease) gives the bitmap of the slots its
 * sets were written in (hub_key_runslots); the walk reads the run's sets
 * of those slots (SUNION: up to REAP_CHUNK slots per read on one Redis,
 * one slot per read where calls keep to one slot), then marks their
 * devices offline, REAP_BATCH at a time, each batch after renewing the
 * claim (which checks again that the lease is still expired); a chunk is
 * read again until it is empty; then reap_done drops the lease, the claim
 * and the bitmap. docs/streams.md "Instance leases". */
struct hub_lease {
	struct hub *hub;
	int script_release, script_reap, script_claim, script_done;
	lws_sorted_usec_list_t sul_poll, sul_reap;
	struct renewer w;
	char run_id[RUN_ID_MAX];       /* "<instance>:<run token>" */
	char epoch[EPOCH_HEX + 1];     /* the Redis epoch last seen; "" = none yet */
	bool ever_registered;          /* this process's lease was written once */
	bool reaping, stopped;
	bool rebuild_owed;             /* re-announce once no reaper claims this run */
	int64_t ok_since_us;           /* renewed without a gap since; 0 = not */
	int64_t slow_logged_us;        /* a slow renewal was last logged then */
	int64_t failed_logged_us;      /* a failed one */
	uint64_t reconnects;           /* metrics.redis_reconnects_total then */
	char dead[MAX_DEAD][RUN_ID_MAX]; /* expired runs to reap, the last first */
	int ndead;
	char reaping_run[RUN_ID_MAX];
	long long reaped;              /* devices of reaping_run marked offline */
	/* the walk over reaping_run's slots */
	bool have_bits;                /* bits holds reaping_run's bitmap */
	unsigned char bits[HUB_SLOTS / 8];
	unsigned next_slot;            /* the next slot to read */
	unsigned chunk[REAP_CHUNK];    /* the marked slots being read */
	size_t nchunk;
	char **members;                /* the chunk's devices read, to reap */
	size_t nmembers, at;
	int64_t claimed_us;            /* the claim was last renewed then */
	int claim_next;                /* what follows the claim in flight (enum reap_next) */
	/* release */
	size_t rel_pending, rel_held;
};

enum reap_next { REAP_READ, REAP_BATCH_NEXT };

static void reap(lws_sorted_usec_list_t *sul);
static void reap_read(struct hub_lease *L);
static void reap_batch(struct hub_lease *L);

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
static int eval(struct hub_lease *L, int script, hub_redis_cb cb, void *arg, int nkeys,
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
	return hub_redis_command_argv(L->hub->redis, cb, arg, 3 + nkeys + argc, av, NULL);
}

static bool bit_set(const unsigned char *bits, unsigned s)
{
	return bits[s / 8] & (0x80u >> (s % 8));
}

static void members_free(struct hub_lease *L)
{
	for (size_t i = 0; i < L->nmembers; i++)
		free(L->members[i]);
	free(L->members);
	L->members = NULL;
	L->nmembers = L->at = 0;
}

static void walk_reset(struct hub_lease *L)
{
	members_free(L);
	L->have_bits = false;
	L->next_slot = 0;
	L->nchunk = 0;
	L->reaping_run[0] = '\0';
	L->reaped = 0;
}

/* The run being reaped is done with (reaped, or not to be reaped by us). */
static void dead_done(struct hub_lease *L, const char *run)
{
	if (L->ndead && !strcmp(L->dead[L->ndead - 1], run))
		L->ndead--;
	walk_reset(L);
	lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1); /* the next one */
}

static const char *cur_dead(const struct hub_lease *L)
{
	return L->ndead ? L->dead[L->ndead - 1] : NULL;
}

static void on_done(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;
	char run[RUN_ID_MAX];

	L->reaping = false;
	if (L->stopped || !L->ndead)
		return;
	snprintf(run, sizeof(run), "%s", L->dead[L->ndead - 1]);
	if (!r || r->type != REDIS_REPLY_INTEGER) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("lease: reaping failed: %s", r->str);
		walk_reset(L);
		return; /* tried again after the next renewal */
	}
	if (L->have_bits && L->reaping_run[0])
		hub_warn("hub run %s reaped: %lld devices marked offline", run, L->reaped);
	dead_done(L, run);
}

/* reap_done: the walk found every marked slot's set empty (or the run
 * turned out live: only the claim goes). */
static void reap_finish(struct hub_lease *L)
{
	const char *run = cur_dead(L);
	char claim[HUB_KEY_MAX], slots[HUB_KEY_MAX];
	const char *keys[3] = { HUB_KEY_LEASES, claim, slots };
	const char *argv[2] = { L->run_id, run };

	if (!run || !hub_key_run_reaper(claim, sizeof(claim), run) ||
	    !hub_key_runslots(slots, sizeof(slots), run))
		return;
	if (!eval(L, L->script_done, on_done, L, 3, keys, 2, argv))
		L->reaping = true;
}

static void on_claim(redisReply *r, void *arg);

/* Claims (or renews the claim on) the run being reaped, then goes on with
 * next. */
static void reap_claim(struct hub_lease *L, enum reap_next next)
{
	const char *run = cur_dead(L);
	char claim[HUB_KEY_MAX], slots[HUB_KEY_MAX], ms[24];
	const char *keys[3] = { HUB_KEY_LEASES, claim, slots };
	const char *argv[4] = { L->run_id, run, ms, L->have_bits ? "0" : "1" };

	if (!run || !hub_key_run_reaper(claim, sizeof(claim), run) ||
	    !hub_key_runslots(slots, sizeof(slots), run)) {
		if (run)
			dead_done(L, run); /* not a run id: not ours to reap */
		return;
	}
	snprintf(ms, sizeof(ms), "%d", L->hub->cfg.lease_ttl_ms);
	L->claim_next = next;
	if (!eval(L, L->script_claim, on_claim, L, 3, keys, 4, argv))
		L->reaping = true;
}

static void on_claim(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;
	enum reap_next next = (enum reap_next)L->claim_next;
	const char *run;

	L->reaping = false;
	if (L->stopped || !(run = cur_dead(L)))
		return;
	if (el_int(r, 0) == 0) {
		/* Live again, or another reaps it. A walk we began drops our
		 * claim: a late run waits for it to go before it re-announces. */
		if (L->have_bits) {
			L->have_bits = false;
			reap_finish(L);
		} else {
			dead_done(L, run);
		}
		return;
	}
	if (el_int(r, 0) != 1) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("lease: reaping failed: %s", r->str);
		walk_reset(L);
		return; /* tried again after the next renewal */
	}
	L->claimed_us = hub_mono_us();
	if (!L->have_bits) {
		const redisReply *b = r->element[1];
		memset(L->bits, 0, sizeof(L->bits));
		if (b->type == REDIS_REPLY_STRING)
			memcpy(L->bits, b->str, b->len < sizeof(L->bits) ? b->len : sizeof(L->bits));
		L->have_bits = true;
		L->next_slot = 0;
		L->nchunk = 0;
		snprintf(L->reaping_run, sizeof(L->reaping_run), "%s", run);
		L->reaped = 0;
		hub_warn("lease of hub run %s expired: marking its devices offline", run);
	}
	if (next == REAP_READ)
		reap_read(L);
	else
		reap_batch(L);
}

static void on_reaped(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;

	L->reaping = false;
	if (L->stopped || !L->ndead)
		return;
	if (!r || r->type != REDIS_REPLY_INTEGER) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("lease: reaping failed: %s", r->str);
		walk_reset(L);
		return; /* tried again after the next renewal */
	}
	L->reaped += r->integer > 0 ? r->integer : 0;
	/* The next batch (or the chunk read again) in the next loop turn, so
	 * gateways and other Redis work go in between. */
	lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1);
}

/* Marks offline the next REAP_BATCH devices read (the claim was just
 * renewed). On a cluster they are all of one slot (a chunk is one slot). */
static void reap_batch(struct hub_lease *L)
{
	const char *run = cur_dead(L);
	size_t n = L->nmembers - L->at;
	char key[HUB_KEY_MAX];
	hub_buf b = { 0 };

	if (n > REAP_BATCH)
		n = REAP_BATCH;
	hub_resp_head(&b, 3 + 2 * n + 2 + n);
	hub_resp_evalsha(&b, L->hub->redis, L->script_reap, 2 * n);
	for (size_t i = 0; i < n; i++) {
		const char *d = L->members[L->at + i];
		hub_resp_arg(&b, key, hub_key_dev(key, sizeof(key), d));
		hub_resp_arg(&b, key, hub_key_idx_run(key, sizeof(key), hub_dev_slot(d), run));
	}
	hub_resp_str(&b, run);
	hub_resp_arg(&b, HUB_CH_PRESENCE, sizeof(HUB_CH_PRESENCE) - 1);
	for (size_t i = 0; i < n; i++)
		hub_resp_str(&b, L->members[L->at + i]);
	L->at += n;
	if (!hub_redis_command_formatted(L->hub->redis, on_reaped, L, b.data, b.len))
		L->reaping = true;
	else
		walk_reset(L);
	hub_buf_free(&b);
}

/* The chunk's sets were read: reap what they hold, or go on past them. */
static void on_members(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;

	L->reaping = false;
	if (L->stopped || !L->ndead)
		return;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		walk_reset(L);
		return; /* tried again after the next renewal */
	}
	members_free(L);
	if (!r->elements) {
		L->nchunk = 0; /* empty: on to the next slots */
		lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1);
		return;
	}
	L->members = hub_xmalloc(r->elements * sizeof(*L->members));
	for (size_t i = 0; i < r->elements; i++)
		if (r->element[i]->type == REDIS_REPLY_STRING &&
		    hub_id_valid(r->element[i]->str, r->element[i]->len))
			L->members[L->nmembers++] = hub_xstrdup(r->element[i]->str);
	if (!L->nmembers) {
		L->nchunk = 0;
		lws_sul_schedule(L->hub->ctx, 0, &L->sul_reap, reap, 1);
		return;
	}
	reap_claim(L, REAP_BATCH_NEXT);
}

/* Reads the run's sets of the current chunk of marked slots (the next
 * chunk when none is current); when no marked slot is left, finishes. */
static void reap_read(struct hub_lease *L)
{
	const char *run = cur_dead(L);
	size_t max = hub_redis_split(L->hub->redis) ? 1 : REAP_CHUNK;
	char (*keys)[HUB_KEY_MAX];
	const char **argv;

	if (!L->nchunk) {
		while (L->next_slot < HUB_SLOTS && L->nchunk < max) {
			if (bit_set(L->bits, L->next_slot))
				L->chunk[L->nchunk++] = L->next_slot;
			L->next_slot++;
		}
		if (!L->nchunk) {
			reap_finish(L);
			return;
		}
	}
	keys = hub_xmalloc(L->nchunk * sizeof(*keys));
	argv = hub_xmalloc((1 + L->nchunk) * sizeof(*argv));
	argv[0] = "SUNION";
	for (size_t i = 0; i < L->nchunk; i++) {
		hub_key_idx_run(keys[i], sizeof(keys[i]), L->chunk[i], run);
		argv[1 + i] = keys[i];
	}
	if (!hub_redis_command_argv(L->hub->redis, on_members, L, (int)(1 + L->nchunk), argv, NULL))
		L->reaping = true;
	else
		walk_reset(L);
	free(argv);
	free(keys);
}

/* Reaps the last of the expired runs the renewal named, a step at a time:
 * the claim (with the run's slot bitmap), then per chunk of marked slots a
 * read and batches of reap calls, then reap_done. */
static void reap(lws_sorted_usec_list_t *sul)
{
	struct hub_lease *L = lws_container_of(sul, struct hub_lease, sul_reap);
	const char *run;

	if (L->reaping || L->stopped || !(run = cur_dead(L)))
		return;
	if (L->have_bits && strcmp(L->reaping_run, run))
		walk_reset(L); /* another run came first */
	if (!L->have_bits) {
		reap_claim(L, REAP_READ);
	} else if (L->at < L->nmembers) {
		reap_claim(L, REAP_BATCH_NEXT);
	} else if (hub_mono_us() - L->claimed_us > (int64_t)L->hub->cfg.lease_ttl_ms * 250) {
		reap_claim(L, REAP_READ); /* keep the claim through empty slots */
	} else {
		members_free(L);
		reap_read(L);
	}
}

/* The expired runs the renewal named (oldest first), kept in reverse so
 * that the oldest is reaped first; a run being reaped now stays the one
 * reaped next. */
static void take_dead(struct hub_lease *L, const struct renew_result *res)
{
	char cur[RUN_ID_MAX] = "";

	if (L->ndead)
		snprintf(cur, sizeof(cur), "%s", L->dead[L->ndead - 1]);
	L->ndead = 0;
	for (int i = res->nruns; i > 0 && L->ndead < MAX_DEAD; i--) {
		const char *run = res->runs[i - 1];
		if (!strcmp(run, cur) || !strcmp(run, L->run_id))
			continue;
		snprintf(L->dead[L->ndead++], RUN_ID_MAX, "%s", run);
	}
	if (cur[0] && L->ndead < MAX_DEAD)
		snprintf(L->dead[L->ndead++], RUN_ID_MAX, "%s", cur);
	reap(&L->sul_reap);
}

/* ---- the renewer thread ---------------------------------------------------
 * Blocking Redis (hub/rc.h: the seeds in turn; on a cluster, the primary
 * of {hub}, MOVED and ASK followed) on connections of its own. Only this
 * thread touches w->rc, registered and stuck_said; it reads the hub's
 * configuration, which does not change while it runs. */

static void renew_parse(const redisReply *r, struct renew_result *res)
{
	const char *ep = el_str(r, 0);
	const redisReply *runs;

	res->had = el_int(r, 1);
	res->expired = el_int(r, 2);
	res->dead = el_int(r, 3);
	res->claimed = el_int(r, 5);
	if (!ep || strlen(ep) > EPOCH_HEX || res->had < 0 || res->expired < 0 || res->dead < 0 ||
	    res->claimed < 0 || r->elements < 6) {
		res->status = RENEW_FAILED;
		snprintf(res->err, sizeof(res->err), "%s",
			 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
		return;
	}
	res->status = RENEW_OK;
	snprintf(res->epoch, sizeof(res->epoch), "%s", ep);
	runs = r->element[4];
	for (size_t i = 0; runs->type == REDIS_REPLY_ARRAY && i < runs->elements &&
	     res->nruns < MAX_DEAD; i++) {
		const redisReply *e = runs->element[i];
		if (e->type == REDIS_REPLY_STRING && e->len < RUN_ID_MAX)
			memcpy(res->runs[res->nruns++], e->str, e->len + 1);
	}
}

/* One renewal: lease_renew (EVAL: nothing to load first). */
static void renew_once(struct hub_lease *L, struct renew_result *res)
{
	struct renewer *w = &L->w;
	const struct hub_config *cfg = &L->hub->cfg;
	unsigned char raw[EPOCH_HEX / 2];
	char ttl[24], cand[EPOCH_HEX + 1], claim[HUB_KEY_MAX];
	const char *argv[] = { "EVAL", hub_lua_lease_renew, "4", HUB_KEY_LEASES, HUB_KEY_EPOCH,
			       HUB_LAYOUT_KEY, claim, L->hub->instance_id, L->run_id, ttl,
			       w->registered ? "0" : "1", cand, HUB_LAYOUT_VERSION };
	int64_t t0 = hub_mono_us();
	redisReply *r;

	/* A fresh candidate each time: the same one set again after a second
	 * empty restart would hide that restart. */
	if (RAND_bytes(raw, sizeof(raw)) != 1)
		abort();
	for (size_t i = 0; i < sizeof(raw); i++)
		snprintf(cand + 2 * i, 3, "%02x", raw[i]);
	snprintf(ttl, sizeof(ttl), "%d", cfg->lease_ttl_ms);
	hub_key_run_reaper(claim, sizeof(claim), L->run_id);
	r = rc_cmd(w->rc, HUB_KEY_LEASES, (int)(sizeof(argv) / sizeof(*argv)), argv, NULL);
	if (!r) {
		res->status = RENEW_FAILED;
		snprintf(res->err, sizeof(res->err), "%s", rc_error(w->rc));
	} else {
		renew_parse(r, res);
		freeReplyObject(r);
		if (res->status == RENEW_OK)
			w->registered = true;
	}
	res->took_us = hub_mono_us() - t0;
}

static void batch_add(struct renew_batch *b, const struct renew_result *res)
{
	if (res->took_us > b->took_max_us)
		b->took_max_us = res->took_us;
	b->last_ok = res->status == RENEW_OK;
	if (res->status == RENEW_OK) {
		b->answered = true;
		b->ok = *res;
		b->gone |= !res->had;
		b->expired |= res->expired != 0;
		return;
	}
	b->gap = true;
	if (res->status == RENEW_FAILED) {
		b->failed++;
		snprintf(b->err, sizeof(b->err), "%s", res->err);
	}
}

static void *renewer_main(void *arg)
{
	struct hub_lease *L = arg;
	struct renewer *w = &L->w;
	int64_t every = (int64_t)L->hub->cfg.lease_renew_ms * 1000;
	int64_t stuck = (int64_t)L->hub->cfg.lease_ttl_ms * 1000 * STUCK_TTLS;
	int64_t next = hub_mono_us() + every;
	struct renew_result *res = hub_xmalloc(sizeof(*res));

	pthread_mutex_lock(&w->mu);
	while (!w->stop) {
		int64_t now = hub_mono_us();
		if (!w->kick && now < next) {
			struct timespec ts;
			clock_gettime(CLOCK_MONOTONIC, &ts);
			ts.tv_sec += (time_t)((next - now) / 1000000);
			ts.tv_nsec += (long)((next - now) % 1000000) * 1000;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pthread_cond_timedwait(&w->cv, &w->mu, &ts);
			continue;
		}
		w->kick = false;
		next = now + every;
		bool may = w->may_renew;
		int64_t loop_age = now - w->loop_us;
		pthread_mutex_unlock(&w->mu);

		memset(res, 0, sizeof(*res));
		if (!may) {
			res->status = RENEW_DOWN;
		} else if (loop_age > stuck) {
			res->status = RENEW_STUCK;
			if (!w->stuck_said)
				hub_warn("lease: the event loop has not turned for %lld ms: not renewing "
					 "this hub's lease (it is stuck, not busy: another hub will mark "
					 "its devices offline)", (long long)loop_age / 1000);
			w->stuck_said = true;
		} else {
			w->stuck_said = false;
			renew_once(L, res);
		}

		pthread_mutex_lock(&w->mu);
		if (!w->unseen)
			memset(&w->batch, 0, sizeof(w->batch));
		batch_add(&w->batch, res);
		w->unseen = true;
	}
	pthread_mutex_unlock(&w->mu);
	free(res);
	return NULL;
}

/* ---- the loop's side ------------------------------------------------------ */

/* A renewal that took a quarter of the lease is a lease close to expiring:
 * said, at most every 10 s. The loop's business does not count (the
 * thread does not wait for it): this is Redis's (and the network's). */
static void renew_slow(struct hub_lease *L, int64_t took_us, int64_t now)
{
	if (took_us < (int64_t)L->hub->cfg.lease_ttl_ms * 250 ||
	    now - L->slow_logged_us < 10 * 1000000)
		return;
	L->slow_logged_us = now;
	hub_warn("lease: a renewal took %lld ms of the %d ms lease, waiting for Redis",
		 (long long)took_us / 1000, L->hub->cfg.lease_ttl_ms);
}

/* What the renewals found, acted on in the loop. */
static void renewed(struct hub_lease *L, const struct renew_batch *b, int64_t now)
{
	struct hub *hub = L->hub;
	const struct renew_result *res = &b->ok;
	bool rebuild = false;

	if (b->failed && now - L->failed_logged_us >= 10 * 1000000) {
		L->failed_logged_us = now;
		hub_err("lease: renewal failed: %s", b->err);
	}
	if (b->gap)
		L->ok_since_us = 0;
	if (!b->answered)
		return;
	renew_slow(L, b->took_max_us, now);
	if (L->epoch[0] && strcmp(L->epoch, res->epoch)) {
		hub_warn("Redis holds another data generation (" HUB_KEY_EPOCH " %.16s, was %s): "
			 "it restarted empty or was flushed or replaced; re-announcing the devices "
			 "of this hub's connections", res->epoch, L->epoch);
		rebuild = true;
	} else if (L->ever_registered && (b->gone || b->expired)) {
		hub_warn("lease: this hub's lease %s in Redis (missed renewals: Redis or the "
			 "hub stalled): re-announcing the devices of its connections",
			 b->gone ? "was gone" : "had expired");
		rebuild = true;
	}
	/* A reaper that claimed this run may still be marking its devices
	 * offline, slot by slot: the re-announce waits until the claim is gone
	 * (the reaper dropped it, or it expired), so that it comes after every
	 * reap call (docs/streams.md "Instance leases"). */
	if (rebuild && res->claimed) {
		if (!L->rebuild_owed)
			hub_warn("lease: a reaper is marking this hub's devices offline: "
				 "re-announcing them once it is done");
		L->rebuild_owed = true;
		rebuild = false;
	} else if (L->rebuild_owed && !res->claimed) {
		rebuild = true;
	}
	if (rebuild) {
		L->rebuild_owed = false;
		hub_registry_forget_slots(hub);
	}
	if (L->epoch[0] && strcmp(L->epoch, res->epoch) && !hub_redis_cluster(hub->redis)) {
		/* lease_renew put HUB_LAYOUT_KEY back; on one Redis the layout-2
		 * key goes back too, as the tombstone that keeps a hub of layout 2
		 * off this Redis (layout.lua). A cluster never had one. */
		const char *argv[4] = { "SET", "iot:layout", HUB_LAYOUT_VERSION, "NX" };
		hub_redis_command_argv(hub->redis, NULL, NULL, 4, argv, NULL);
	}
	snprintf(L->epoch, sizeof(L->epoch), "%s", res->epoch);
	L->ever_registered = true;
	/* Reaping waits until this hub has renewed without a gap for a whole
	 * ttl: after an outage of its own, the others need that long to renew
	 * theirs. */
	if (b->gone || b->expired || L->reconnects != hub->metrics.redis_reconnects_total ||
	    !L->ok_since_us)
		L->ok_since_us = now;
	L->reconnects = hub->metrics.redis_reconnects_total;
	struct hub_ev_lease ev = { rebuild };
	hub_emit(hub, HUB_EV_LEASE_RENEWED, &ev);
	if (!b->last_ok) {
		L->ok_since_us = 0; /* the latest one was not answered */
		return;
	}
	if (res->dead > 0 && now - L->ok_since_us >= (int64_t)hub->cfg.lease_ttl_ms * 1000)
		take_dead(L, res);
}

/* Every POLL_US: tells the renewer that the loop turns and whether the
 * command connection is up, and takes what it found. */
static void poll_cb(lws_sorted_usec_list_t *sul)
{
	struct hub_lease *L = lws_container_of(sul, struct hub_lease, sul_poll);
	struct renewer *w = &L->w;
	struct renew_batch *b = NULL;
	int64_t now = hub_mono_us();
	bool up = hub_redis_up(L->hub->redis);

	pthread_mutex_lock(&w->mu);
	w->loop_us = now;
	if (up && !w->may_renew) {
		w->kick = true; /* up again: renew and check the epoch now */
		pthread_cond_signal(&w->cv);
	}
	w->may_renew = up;
	if (w->unseen) {
		w->unseen = false;
		b = hub_xmalloc(sizeof(*b));
		*b = w->batch;
	}
	pthread_mutex_unlock(&w->mu);
	if (b && !L->stopped)
		renewed(L, b, now);
	free(b);
	if (!L->stopped)
		lws_sul_schedule(L->hub->ctx, 0, &L->sul_poll, poll_cb, POLL_US);
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
	 * returns, so from a timer. */
	pthread_mutex_lock(&L->w.mu);
	L->w.may_renew = false; /* the poll sees it up and kicks the renewer */
	pthread_mutex_unlock(&L->w.mu);
	lws_sul_schedule(L->hub->ctx, 0, &L->sul_poll, poll_cb, 1);
}

static void renewer_stop(struct hub_lease *L)
{
	if (!L->w.running)
		return;
	pthread_mutex_lock(&L->w.mu);
	L->w.stop = true;
	pthread_cond_signal(&L->w.cv);
	pthread_mutex_unlock(&L->w.mu);
	/* At most one renewal in flight: redis-timeout-ms per step. */
	pthread_join(L->w.tid, NULL);
	L->w.running = false;
}

static int lease_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_lease *L = hub_xcalloc(1, sizeof(*L));
	pthread_condattr_t ca;
	const char *hosts[HUB_REDIS_SEEDS_MAX];
	int ports[HUB_REDIS_SEEDS_MAX];
	int rc;

	hub->lease = L;
	L->hub = hub;
	snprintf(L->run_id, sizeof(L->run_id), "%s:%s", hub->instance_id, hub->run_token);
	L->script_release = hub_redis_add_script(hub->redis, hub_lua_lease_release);
	L->script_reap = hub_redis_add_script(hub->redis, hub_lua_reap);
	L->script_claim = hub_redis_add_script(hub->redis, hub_lua_reap_claim);
	L->script_done = hub_redis_add_script(hub->redis, hub_lua_reap_done);
	hub_observe(hub, HUB_EV_REDIS_READY, on_redis_ready, L);
	pthread_mutex_init(&L->w.mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&L->w.cv, &ca);
	pthread_condattr_destroy(&ca);
	for (int i = 0; i < hub->cfg.redis_nseeds; i++) {
		hosts[i] = hub->cfg.redis_seeds[i].host;
		ports[i] = hub->cfg.redis_seeds[i].port;
	}
	L->w.rc = rc_new_seeds(hosts, ports, hub->cfg.redis_nseeds, hub->cfg.redis_password,
			       hub->cfg.redis_db, hub->cfg.redis_timeout_ms);
	if (!L->w.rc) {
		snprintf(err, errlen, "lease: no Redis seed to renew on");
		return -1;
	}
	L->w.loop_us = hub_mono_us();
	rc = pthread_create(&L->w.tid, NULL, renewer_main, L);
	if (rc) {
		snprintf(err, errlen, "lease: cannot start the renewer thread: %s", strerror(rc));
		return -1;
	}
	L->w.running = true;
	lws_sul_schedule(hub->ctx, 0, &L->sul_poll, poll_cb, POLL_US);
	return 0;
}

/* ---- release ------------------------------------------------------------ */

/* lease_release: with the count of the run's non-empty sets found slot by
 * slot (a cluster), or with those sets in its KEYS (one Redis). */
static void release_send(struct hub_lease *L, const unsigned char *bits, size_t nbits)
{
	char slots[HUB_KEY_MAX], key[HUB_KEY_MAX], held[24];
	bool split = hub_redis_split(L->hub->redis);
	size_t nk = 0;
	hub_buf b = { 0 };

	hub_key_runslots(slots, sizeof(slots), L->run_id);
	for (unsigned s = 0; !split && s < nbits * 8 && s < HUB_SLOTS; s++)
		nk += bit_set(bits, s);
	hub_resp_head(&b, 3 + 2 + nk + 2);
	hub_resp_evalsha(&b, L->hub->redis, L->script_release, 2 + nk);
	hub_resp_arg(&b, HUB_KEY_LEASES, sizeof(HUB_KEY_LEASES) - 1);
	hub_resp_str(&b, slots);
	for (unsigned s = 0; !split && s < nbits * 8 && s < HUB_SLOTS; s++)
		if (bit_set(bits, s))
			hub_resp_arg(&b, key, hub_key_idx_run(key, sizeof(key), s, L->run_id));
	hub_resp_str(&b, L->run_id);
	snprintf(held, sizeof(held), "%zu", L->rel_held);
	hub_resp_str(&b, held);
	hub_redis_command_formatted(L->hub->redis, NULL, NULL, b.data, b.len);
	hub_buf_free(&b);
}

static void on_rel_exists(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;

	/* An unanswered check counts as a set that holds devices: the lease
	 * is then expired for a reaper, which finds out. */
	if (!r || r->type != REDIS_REPLY_INTEGER || r->integer)
		L->rel_held++;
	if (!--L->rel_pending)
		release_send(L, NULL, 0);
}

/* The run's bitmap was read: check its sets, then release. */
static void on_rel_bits(redisReply *r, void *arg)
{
	struct hub_lease *L = arg;
	const unsigned char *bits = NULL;
	size_t nbits = 0;

	if (!r || (r->type != REDIS_REPLY_STRING && r->type != REDIS_REPLY_NIL))
		return; /* the lease expires by itself; a reaper finds the sets */
	if (r->type == REDIS_REPLY_STRING) {
		bits = (const unsigned char *)r->str;
		nbits = r->len;
	}
	L->rel_held = 0;
	if (!hub_redis_split(L->hub->redis)) {
		release_send(L, bits, nbits);
		return;
	}
	/* Slot by slot: an EXISTS per marked slot, the release after the last. */
	L->rel_pending = 1;
	for (unsigned s = 0; s < nbits * 8 && s < HUB_SLOTS; s++) {
		char key[HUB_KEY_MAX];
		const char *argv[2] = { "EXISTS", key };
		if (!bit_set(bits, s))
			continue;
		hub_key_idx_run(key, sizeof(key), s, L->run_id);
		if (!hub_redis_command_argv(L->hub->redis, on_rel_exists, L, 2, argv, NULL))
			L->rel_pending++;
		else
			L->rel_held++;
	}
	if (!--L->rel_pending)
		release_send(L, NULL, 0);
}

/* Shutdown, after the gateways were drained: gives the lease up (removed
 * when this run holds no device any more, else expired at once for a
 * reaper): reads the run's slot bitmap, checks the run's sets of those
 * slots, then lease_release; the hub lets the loop write it before
 * disconnecting Redis (it waits while commands are pending). */
static void lease_stop(struct hub *hub)
{
	struct hub_lease *L = hub->lease;
	char key[HUB_KEY_MAX];
	const char *argv[2] = { "GET", key };

	if (!L || L->stopped)
		return;
	L->stopped = true;
	renewer_stop(L); /* before the release: no renewal after it */
	lws_sul_cancel(&L->sul_poll);
	lws_sul_cancel(&L->sul_reap);
	/* The thread may have written it before the loop took its answer. */
	if ((L->ever_registered || L->w.registered) && hub_redis_up(hub->redis) &&
	    hub_key_runslots(key, sizeof(key), L->run_id))
		hub_redis_command_argv(hub->redis, on_rel_bits, L, 2, argv, NULL);
}

static void lease_free(struct hub *hub)
{
	if (hub->lease) {
		renewer_stop(hub->lease); /* a start that failed later on */
		rc_free(hub->lease->w.rc);
		members_free(hub->lease);
		pthread_mutex_destroy(&hub->lease->w.mu);
		pthread_cond_destroy(&hub->lease->w.cv);
	}
	free(hub->lease);
	hub->lease = NULL;
}

const struct hub_module hub_lease_module = {
	.name = "lease",
	.start = lease_start,
	.stop = lease_stop,
	.free = lease_free,
};
