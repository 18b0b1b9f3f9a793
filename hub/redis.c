#include "hub/redis.h"

#include <errno.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <hiredis/async.h>
#include <libwebsockets.h>
#include <openssl/sha.h>

#include "hub/hub.h"
#include "hub/log.h"
#include "hub/util.h"
#include "hub_lua.h"

#define WATCHDOG_US       (200 * 1000)
#define IDLE_PING_US      (500 * 1000)
/* Up (hub_redis_up) means answering: while commands are pending, a reply
 * (to any of them) within this of the last reply or of the oldest one's
 * sending, whichever is later; while idle, a reply within IDLE_PING_US +
 * WATCHDOG_US + this. A Redis working through a long queue keeps replying
 * and stays up; a stalled one (SIGSTOP) is "down" within about 1.5 s,
 * whatever redis-timeout-ms (which decides when the connection is dropped). */
#define STALL_US          (750 * 1000)
#define BACKOFF_MIN_MS    100
#define MAX_SCRIPTS       HUB_LUA_COUNT   /* every embedded script, once */
#define MAX_GATES         4
#define UNSUB_LINGER_US   (5 * 1000 * 1000)
#define WAIT_PENDING      INT_MIN
#define WAIT_WARN_US      (10 * 1000 * 1000)

struct pending {
	hub_redis_cb cb;
	void *arg;
	int64_t t0;
};

enum rc_state { RC_DOWN, RC_CONNECTING, RC_UP };

struct rconn {
	struct hub_redis *r;
	const char *name;
	int seed;                  /* the seed it tries next (the seed connections) */
	char host[HUB_REDIS_HOST_MAX]; /* where it connects: a seed's host, as configured */
	int port;
	char addr[INET6_ADDRSTRLEN]; /* host resolved at the last connect */
	bool is_sub;
	redisAsyncContext *ac;
	struct lws *wsi;
	bool in_callback;          /* inside this connection's lws callback */
	enum rc_state state;
	int64_t state_since_us;
	int64_t last_reply_us;
	int backoff_ms;
	lws_sorted_usec_list_t sul_reconnect;
	lws_sorted_usec_list_t sul_drop;
	const char *drop_why;      /* for sul_drop: NULL = socket closed or setup failed */
	struct pending *ring;
	size_t ring_cap, ring_head, ring_len;
};

/* A channel or pattern the sub connection listens to. refs counts users;
 * at zero the subscription lingers UNSUB_LINGER_US (a user often comes back)
 * before UNSUBSCRIBE. Only one (UN)SUBSCRIBE per channel is ever in flight:
 * hiredis 0.14 drops a channel's callback when an UNSUBSCRIBE reply arrives,
 * even if a newer SUBSCRIBE for it was already sent. */
enum ch_state { CH_IDLE, CH_SUBSCRIBING, CH_ACTIVE, CH_UNSUBSCRIBING };

struct hub_redis_channel {
	struct hub_redis_channel *next;
	struct hub_redis *r;
	hub_redis_msg_cb cb;
	hub_redis_state_cb state_cb;
	void *arg;
	unsigned refs;
	bool pattern;
	enum ch_state state;
	int64_t unused_since_us;
	char name[];
};

/* A command that runs on every (re)connect before the connection counts as
 * up, and every recheck_ms while it is (hub_redis_add_gate). */
struct gate {
	struct hub_redis *r;
	int idx;
	int argc;
	char **argv;
	hub_redis_gate_cb check;
	void *arg;
	int recheck_ms;            /* 0: on connect only */
	int64_t last_us;           /* last sent */
	bool inflight;             /* a recheck awaits its reply */
};

/* A command sent with hub_redis_command_durable in ack-durability
 * replicated: its callback runs once both its own reply and the WAIT that
 * covers it have answered. It sits in wait_next (no WAIT sent after it yet)
 * or wait_sent (the WAIT in flight covers it) until that WAIT answers. */
struct durable {
	struct durable *next;
	struct hub_redis *r;
	hub_redis_cb cb;
	void *arg;
	redisReply *reply;         /* a copy of its reply; NULL: failed */
	bool replied;
	int wait_n;                /* replicas the WAIT counted, -1 failed, WAIT_PENDING */
};

struct hub_redis {
	struct hub *hub;
	struct rconn cmd, sub;
	void (*flush)(void *);     /* hub_redis_set_flush: runs before each write */
	void *flush_arg;
	lws_sorted_usec_list_t sul_watchdog;
	bool started, stopping;
	int nscripts;
	const char *scripts[MAX_SCRIPTS];  /* embedded texts (hub_lua.h) */
	char shas[MAX_SCRIPTS][41];
	struct hub_redis_channel *channels;
	int ngates;
	struct gate gates[MAX_GATES];
	bool stalled;              /* the watchdog saw hub_redis_up() false while RC_UP */
	bool wait_inflight;        /* a WAIT awaits its reply (at most one) */
	struct durable *wait_sent; /* covered by that WAIT */
	struct durable *wait_next, **wait_next_tail; /* waiting for the next WAIT */
	int64_t wait_warned_us;
};

static void rconn_connect(struct rconn *rc);
static void rconn_drop(struct rconn *rc, const char *why);
static void sul_reconnect_cb(lws_sorted_usec_list_t *sul);
static void sul_drop_cb(lws_sorted_usec_list_t *sul);
static void send_subscribe(struct hub_redis *r, struct hub_redis_channel *ch);

/* How long the command connection has been silent while it owes a reply
 * (since the last reply, or since the oldest pending command was sent if
 * that is later), or while idle since the last reply. */
static int64_t silence_us(const struct rconn *rc, int64_t now)
{
	int64_t since = rc->last_reply_us;

	if (rc->ring_len && rc->ring[rc->ring_head].t0 > since)
		since = rc->ring[rc->ring_head].t0;
	return now - since;
}

/* ---- the pending ring ---------------------------------------------------- */

static void ring_push(struct rconn *rc, hub_redis_cb cb, void *arg)
{
	if (rc->ring_len == rc->ring_cap) {
		size_t ncap = rc->ring_cap ? rc->ring_cap * 2 : 64;
		struct pending *n = hub_xmalloc(ncap * sizeof(*n));
		for (size_t i = 0; i < rc->ring_len; i++)
			n[i] = rc->ring[(rc->ring_head + i) & (rc->ring_cap - 1)];
		free(rc->ring);
		rc->ring = n;
		rc->ring_cap = ncap;
		rc->ring_head = 0;
	}
	struct pending *p = &rc->ring[(rc->ring_head + rc->ring_len) & (rc->ring_cap - 1)];
	p->cb = cb;
	p->arg = arg;
	p->t0 = hub_mono_us();
	rc->ring_len++;
}

static bool ring_pop(struct rconn *rc, struct pending *out)
{
	if (!rc->ring_len)
		return false;
	*out = rc->ring[rc->ring_head];
	rc->ring_head = (rc->ring_head + 1) & (rc->ring_cap - 1);
	rc->ring_len--;
	return true;
}

/* hiredis calls this for every reply on a ring-tracked command, in order. */
static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct rconn *rc = privdata;
	struct pending p;
	redisReply *rep = reply;

	(void)ac;
	if (!ring_pop(rc, &p)) {
		hub_err("redis %s: reply with no pending command", rc->name);
		return;
	}
	int64_t now = hub_mono_us();
	if (rep) {
		rc->last_reply_us = now;
		hub_hist_observe(&rc->r->hub->metrics.redis_rtt, (double)(now - p.t0) / 1e6);
		if (rep->type == REDIS_REPLY_ERROR)
			rc->r->hub->metrics.redis_errors_total++;
	}
	if (p.cb)
		p.cb(rep, p.arg);
}

static int rconn_send(struct rconn *rc, hub_redis_cb cb, void *arg, int argc,
		      const char **argv, const size_t *argvlen)
{
	if (!rc->ac || rc->state == RC_DOWN)
		return -1;
	if (redisAsyncCommandArgv(rc->ac, on_reply, rc, argc, argv, argvlen) != REDIS_OK)
		return -1;
	ring_push(rc, cb, arg);
	return 0;
}

/* ---- hiredis event hooks -> lws ------------------------------------------ */

static void ev_noop(void *privdata)
{
	(void)privdata;
}

static void ev_add_write(void *privdata)
{
	struct rconn *rc = privdata;

	if (rc->wsi)
		lws_callback_on_writable(rc->wsi);
}

static void ev_cleanup(void *privdata)
{
	struct rconn *rc = privdata;
	struct lws *wsi = rc->wsi;

	if (!wsi)
		return;
	rc->wsi = NULL;
	lws_set_opaque_user_data(wsi, NULL);
	/* Inside this wsi's own callback the callback returns -1 and lws closes
	 * it; from anywhere else close it now. (An async kill is a 0 s timer
	 * that never runs while libev keeps reporting the dead fd.) */
	if (!rc->in_callback)
		lws_set_timeout(wsi, PENDING_TIMEOUT_KILLED_BY_PARENT, LWS_TO_KILL_SYNC);
}

static int redis_proto_cb(struct lws *wsi, enum lws_callback_reasons reason,
			  void *user, void *in, size_t len)
{
	struct rconn *rc;

	switch (reason) {
	case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION:
	case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
		return 1; /* nobody may upgrade to this internal protocol */
	case LWS_CALLBACK_RAW_RX_FILE:
	case LWS_CALLBACK_RAW_WRITEABLE_FILE:
		rc = lws_get_opaque_user_data(wsi);
		if (rc && rc->ac) {
			rc->in_callback = true;
			if (reason == LWS_CALLBACK_RAW_RX_FILE) {
				redisAsyncHandleRead(rc->ac);
			} else {
				if (rc == &rc->r->cmd && rc->r->flush)
					rc->r->flush(rc->r->flush_arg);
				if (rc->ac)
					redisAsyncHandleWrite(rc->ac);
			}
			rc->in_callback = false;
		}
		/* Detached (hiredis freed its context, maybe just now): close
		 * the dup at once. A HUP fd left open would be reported on every
		 * loop turn and starve lws's idle work, timers included. */
		rc = lws_get_opaque_user_data(wsi);
		if (rc && rc->ac)
			return 0;
		if (rc) {
			lws_set_opaque_user_data(wsi, NULL);
			if (rc->wsi == wsi)
				rc->wsi = NULL;
		}
		return -1;
	case LWS_CALLBACK_RAW_CLOSE_FILE:
		rc = lws_get_opaque_user_data(wsi);
		if (rc && rc->wsi == wsi) {
			/* lws closed it under us (POLLHUP/ERR): tell hiredis, but
			 * from a timer, not from inside this callback chain. */
			rc->wsi = NULL;
			lws_sul_schedule(rc->r->hub->ctx, 0, &rc->sul_drop,
					 sul_drop_cb, 1);
		}
		break;
	default:
		break;
	}
	return 0;
}

const struct lws_protocols hub_redis_protocol = {
	"hub-redis-internal", redis_proto_cb, 0, 0, 0, NULL, 0
};

/* ---- connection lifecycle ------------------------------------------------ */

static void set_state(struct rconn *rc, enum rc_state s)
{
	rc->state = s;
	rc->state_since_us = hub_mono_us();
}

static void schedule_reconnect(struct rconn *rc)
{
	struct hub_redis *r = rc->r;

	if (r->stopping)
		return;
	int ms = rc->backoff_ms ? rc->backoff_ms : BACKOFF_MIN_MS;
	int jitter = ms / 4 ? rand() % (ms / 4 + 1) : 0;
	rc->backoff_ms = ms * 2 > r->hub->cfg.redis_backoff_max_ms ?
			 r->hub->cfg.redis_backoff_max_ms : ms * 2;
	lws_sul_schedule(r->hub->ctx, 0, &rc->sul_reconnect,
			 sul_reconnect_cb, (lws_usec_t)(ms + jitter) * 1000);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
	struct rconn *rc = ac->data;

	if (!rc)
		return;
	if (status != REDIS_OK) {
		hub_warn("redis %s: connect to %s:%d failed: %s", rc->name, rc->host, rc->port,
			 ac->errstr ? ac->errstr : "error");
		rc->seed++;
		rc->ac = NULL; /* hiredis frees it (and calls ev_cleanup) after this */
		set_state(rc, RC_DOWN);
		schedule_reconnect(rc);
		return;
	}
	if (strcmp(rc->host, rc->addr))
		hub_info("redis %s: connected to %s:%d (%s)", rc->name, rc->host, rc->port,
			 rc->addr);
	else
		hub_info("redis %s: connected to %s:%d", rc->name, rc->host, rc->port);
	rc->last_reply_us = hub_mono_us();
	if (!rc->is_sub && rc->r->ngates)
		return; /* up when the last gate's reply passes (on_gate_reply) */
	set_state(rc, RC_UP);
	rc->backoff_ms = 0;
	if (rc->is_sub)
		for (struct hub_redis_channel *ch = rc->r->channels; ch; ch = ch->next)
			if (ch->refs)
				send_subscribe(rc->r, ch);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
	struct rconn *rc = ac->data;

	if (!rc)
		return;
	hub_warn("redis %s: disconnected%s%s", rc->name, status == REDIS_OK ? "" : ": ",
		 status == REDIS_OK ? "" : (ac->errstr ? ac->errstr : "error"));
	rc->ac = NULL; /* ev_cleanup already detached the wsi */
	set_state(rc, RC_DOWN);
	schedule_reconnect(rc);
}

static void on_setup_reply(redisReply *reply, void *arg)
{
	struct rconn *rc = arg;

	if (reply && reply->type == REDIS_REPLY_ERROR) {
		hub_err("redis %s: setup command failed: %s", rc->name, reply->str);
		/* Not from inside hiredis: drop on a timer. */
		lws_sul_schedule(rc->r->hub->ctx, 0, &rc->sul_drop,
				 sul_drop_cb, 1);
	}
}

static void gate_refused(struct rconn *rc)
{
	/* Not from inside hiredis: drop on a timer. */
	rc->drop_why = "refused by the connect check";
	lws_sul_schedule(rc->r->hub->ctx, 0, &rc->sul_drop, sul_drop_cb, 1);
}

static void on_gate_reply(redisReply *reply, void *arg)
{
	struct gate *g = arg;
	struct rconn *rc = &g->r->cmd;

	if (!reply || rc->state != RC_CONNECTING)
		return; /* lost meanwhile: the next connection asks again */
	if (!g->check(reply, g->arg)) {
		gate_refused(rc);
		return;
	}
	if (g->idx < g->r->ngates - 1) {
		/* One after the other: a gate that refuses stops the next ones
		 * (the layout script writes) from running at all. */
		struct gate *next = &g->r->gates[g->idx + 1];
		next->last_us = hub_mono_us();
		if (rconn_send(rc, on_gate_reply, next, next->argc, (const char **)next->argv, NULL))
			gate_refused(rc);
		return;
	}
	set_state(rc, RC_UP);
	rc->backoff_ms = 0;
}

static void on_recheck_reply(redisReply *reply, void *arg)
{
	struct gate *g = arg;
	struct rconn *rc = &g->r->cmd;

	g->inflight = false;
	if (reply && rc->state == RC_UP && !g->check(reply, g->arg))
		gate_refused(rc);
}

static void channel_set_state(struct hub_redis_channel *ch, enum ch_state s)
{
	bool was = ch->state == CH_ACTIVE;

	ch->state = s;
	if (ch->state_cb && was != (s == CH_ACTIVE))
		ch->state_cb(ch, s == CH_ACTIVE, ch->arg);
}

/* Every reply for a channel: (p)subscribe confirmations, messages,
 * unsubscribe confirmations, and NULL when the context goes away. */
static void on_sub_message(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct hub_redis_channel *ch = privdata;
	redisReply *rep = reply;
	const char *kind;
	size_t pi;

	(void)ac;
	if (!rep) {
		channel_set_state(ch, CH_IDLE); /* connection gone */
		return;
	}
	if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 3 ||
	    rep->element[0]->type != REDIS_REPLY_STRING)
		return;
	ch->r->sub.last_reply_us = hub_mono_us();
	kind = rep->element[0]->str;
	if (kind[0] == 'p')
		kind++;
	if (!strcmp(kind, "message")) {
		pi = ch->pattern ? 3 : 2;
		if (rep->elements > pi && rep->element[pi]->type == REDIS_REPLY_STRING &&
		    rep->element[pi - 1]->type == REDIS_REPLY_STRING)
			ch->cb(rep->element[pi - 1]->str, rep->element[pi]->str,
			       rep->element[pi]->len, ch->arg);
	} else if (!strcmp(kind, "subscribe")) {
		if (ch->state == CH_SUBSCRIBING)
			channel_set_state(ch, CH_ACTIVE);
	} else if (!strcmp(kind, "unsubscribe")) {
		channel_set_state(ch, CH_IDLE);
		if (ch->refs)
			send_subscribe(ch->r, ch); /* a user came back meanwhile */
	}
}

static void send_subscribe(struct hub_redis *r, struct hub_redis_channel *ch)
{
	const char *argv[2] = { ch->pattern ? "PSUBSCRIBE" : "SUBSCRIBE", ch->name };

	if (r->sub.ac && r->sub.state == RC_UP &&
	    redisAsyncCommandArgv(r->sub.ac, on_sub_message, ch, 2, argv, NULL) == REDIS_OK)
		channel_set_state(ch, CH_SUBSCRIBING);
}

static void send_unsubscribe(struct hub_redis *r, struct hub_redis_channel *ch)
{
	const char *argv[2] = { ch->pattern ? "PUNSUBSCRIBE" : "UNSUBSCRIBE", ch->name };

	if (r->sub.ac && redisAsyncCommandArgv(r->sub.ac, NULL, NULL, 2, argv, NULL) == REDIS_OK)
		channel_set_state(ch, CH_UNSUBSCRIBING);
}

/* Watchdog duty: unsubscribe channels unused for the linger time, free the
 * idle ones nobody holds. */
static void channels_sweep(struct hub_redis *r, int64_t now)
{
	for (struct hub_redis_channel **pp = &r->channels; *pp;) {
		struct hub_redis_channel *ch = *pp;

		if (ch->refs) {
			if (ch->state == CH_IDLE)
				send_subscribe(r, ch); /* connection is back */
			pp = &ch->next;
			continue;
		}
		if (ch->state == CH_ACTIVE && now - ch->unused_since_us > UNSUB_LINGER_US)
			send_unsubscribe(r, ch);
		if (ch->state == CH_IDLE) {
			*pp = ch->next;
			free(ch);
			continue;
		}
		pp = &ch->next;
	}
}

/* host as an address hiredis connects to without a lookup of its own:
 * getaddrinfo, first address. A DNS name blocks the loop for the lookup
 * (there is no asynchronous resolver here; docs/pitfalls.md); an IP
 * address does not. */
static int resolve(const char *host, char *addr, size_t n)
{
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	struct addrinfo *res;
	int rc = getaddrinfo(host, NULL, &hints, &res);

	if (rc)
		return rc;
	rc = getnameinfo(res->ai_addr, res->ai_addrlen, addr, (socklen_t)n, NULL, 0,
			 NI_NUMERICHOST);
	freeaddrinfo(res);
	return rc;
}

/* The seed connections (commands on one Redis, pub/sub) try the seed URLs
 * in turn: the next one after each connect that failed or was lost. */
static void rconn_pick_seed(struct rconn *rc)
{
	const struct hub_config *cfg = &rc->r->hub->cfg;
	const struct hub_redis_seed *s = &cfg->redis_seeds[rc->seed % cfg->redis_nseeds];

	snprintf(rc->host, sizeof(rc->host), "%s", s->host);
	rc->port = s->port;
}

static void rconn_connect(struct rconn *rc)
{
	struct hub_redis *r = rc->r;
	struct hub_config *cfg = &r->hub->cfg;
	redisAsyncContext *ac;
	lws_sock_file_fd_type fd;

	if (r->stopping || rc->ac)
		return;
	rconn_pick_seed(rc);
	int grc = resolve(rc->host, rc->addr, sizeof(rc->addr));
	if (grc) {
		hub_warn("redis %s: cannot resolve %s: %s", rc->name, rc->host, gai_strerror(grc));
		rc->seed++;
		schedule_reconnect(rc);
		return;
	}
	ac = redisAsyncConnect(rc->addr, rc->port);
	if (!ac) {
		hub_err("redis %s: out of memory", rc->name);
		schedule_reconnect(rc);
		return;
	}
	if (ac->err) {
		hub_warn("redis %s: connect to %s:%d failed: %s", rc->name,
			 rc->host, rc->port, ac->errstr);
		rc->seed++;
		redisAsyncFree(ac); /* no callback will ever run for it */
		schedule_reconnect(rc);
		return;
	}
	ac->data = rc;
	ac->ev.data = rc;
	ac->ev.addRead = ev_noop;   /* lws always polls adopted files for POLLIN */
	ac->ev.delRead = ev_noop;
	ac->ev.addWrite = ev_add_write;
	ac->ev.delWrite = ev_noop;  /* lws writability requests are one-shot */
	ac->ev.cleanup = ev_cleanup;
	redisAsyncSetConnectCallback(ac, on_connect);
	redisAsyncSetDisconnectCallback(ac, on_disconnect);

	/* lws closes the fd it adopts; hiredis closes its own: adopt a dup. */
	fd.filefd = dup(ac->c.fd);
	rc->wsi = fd.filefd < 0 ? NULL :
		  lws_adopt_descriptor_vhost(r->hub->vh, LWS_ADOPT_RAW_FILE_DESC, fd,
					     hub_redis_protocol.name, NULL);
	if (!rc->wsi) {
		hub_err("redis %s: cannot adopt socket: %s", rc->name, strerror(errno));
		if (fd.filefd >= 0)
			close(fd.filefd);
		ac->data = NULL;
		ac->ev.cleanup = NULL;
		redisAsyncFree(ac);
		schedule_reconnect(rc);
		return;
	}
	lws_set_opaque_user_data(rc->wsi, rc);
	/* hiredis learns that a non-blocking connect finished from its first
	 * writable event; ask for one even with nothing queued (the pub/sub
	 * connection subscribes only once connected). */
	lws_callback_on_writable(rc->wsi);
	rc->ac = ac;
	set_state(rc, RC_CONNECTING);
	r->hub->metrics.redis_reconnects_total += rc->is_sub ? 0 : 1;

	/* Pipelined ahead of anything else; replies come in order. */
	if (cfg->redis_password) {
		const char *argv[2] = { "AUTH", cfg->redis_password };
		rconn_send(rc, on_setup_reply, rc, 2, argv, NULL);
	}
	if (!rc->is_sub) {
		if (cfg->redis_db) {
			char db[16];
			snprintf(db, sizeof(db), "%d", cfg->redis_db);
			const char *argv[2] = { "SELECT", db };
			rconn_send(rc, on_setup_reply, rc, 2, argv, NULL);
		}
		for (int i = 0; i < r->nscripts; i++) {
			const char *argv[3] = { "SCRIPT", "LOAD", r->scripts[i] };
			rconn_send(rc, on_setup_reply, rc, 3, argv, NULL);
		}
		if (r->ngates) {
			r->gates[0].last_us = hub_mono_us();
			rconn_send(rc, on_gate_reply, &r->gates[0], r->gates[0].argc,
				   (const char **)r->gates[0].argv, NULL);
		}
	}
}

static void rconn_drop(struct rconn *rc, const char *why)
{
	redisAsyncContext *ac = rc->ac;
	struct pending p;

	if (!ac) {
		set_state(rc, RC_DOWN);
		return;
	}
	if (rc->r->stopping)
		hub_info("redis %s: closing: %s", rc->name, why);
	else
		hub_warn("redis %s: dropping connection: %s", rc->name, why);
	rc->ac = NULL;
	ac->data = NULL; /* on_disconnect must not reschedule */
	set_state(rc, RC_DOWN);
	redisAsyncFree(ac); /* runs every pending callback with NULL */
	while (ring_pop(rc, &p))
		if (p.cb)
			p.cb(NULL, p.arg);
	ev_cleanup(rc);
	schedule_reconnect(rc);
}

static void sul_reconnect_cb(lws_sorted_usec_list_t *sul)
{
	struct rconn *rc = lws_container_of(sul, struct rconn, sul_reconnect);

	rconn_connect(rc);
}

static void sul_drop_cb(lws_sorted_usec_list_t *sul)
{
	struct rconn *rc = lws_container_of(sul, struct rconn, sul_drop);
	const char *why = rc->drop_why ? rc->drop_why : "socket closed or setup failed";

	rc->drop_why = NULL;
	rconn_drop(rc, why);
}

static void watchdog_cb(lws_sorted_usec_list_t *sul)
{
	struct hub_redis *r = lws_container_of(sul, struct hub_redis, sul_watchdog);
	int64_t now = hub_mono_us(), timeout = (int64_t)r->hub->cfg.redis_timeout_ms * 1000;
	struct rconn *rc = &r->cmd;

	if (r->stopping)
		return;
	if (rc->state == RC_CONNECTING && now - rc->state_since_us > timeout) {
		rconn_drop(rc, "connect timed out");
		rconn_drop(&r->sub, "command connection timed out");
	} else if (rc->state == RC_UP && rc->ring_len &&
		   now - rc->ring[rc->ring_head].t0 > timeout) {
		char why[96];
		snprintf(why, sizeof(why), "no reply for %d ms (%zu commands pending)",
			 r->hub->cfg.redis_timeout_ms, rc->ring_len);
		rconn_drop(rc, why);
		rconn_drop(&r->sub, "command connection stalled");
	} else if (rc->state == RC_UP && !rc->ring_len &&
		   now - rc->last_reply_us > IDLE_PING_US) {
		const char *argv[1] = { "PING" };
		rconn_send(rc, NULL, NULL, 1, argv, NULL);
	}
	if (rc->state == RC_UP) {
		bool up = hub_redis_up(r);
		if (!up && !r->stalled)
			hub_warn("redis %s: no reply for %lld ms (%zu commands pending): counted as "
				 "down (not ready, telemetry answered unavailable) until it answers",
				 rc->name, (long long)silence_us(rc, now) / 1000, rc->ring_len);
		else if (up && r->stalled)
			hub_info("redis %s: answering again", rc->name);
		r->stalled = !up;
		for (int i = 0; i < r->ngates; i++) {
			struct gate *g = &r->gates[i];
			if (g->recheck_ms && !g->inflight &&
			    now - g->last_us >= (int64_t)g->recheck_ms * 1000 &&
			    !rconn_send(rc, on_recheck_reply, g, g->argc, (const char **)g->argv, NULL)) {
				g->inflight = true;
				g->last_us = now;
			}
		}
	} else {
		r->stalled = false;
	}
	if (r->sub.state == RC_CONNECTING && now - r->sub.state_since_us > timeout)
		rconn_drop(&r->sub, "connect timed out");
	channels_sweep(r, now);
	lws_sul_schedule(r->hub->ctx, 0, &r->sul_watchdog, watchdog_cb, WATCHDOG_US);
}

/* ---- public -------------------------------------------------------------- */

struct hub_redis *hub_redis_new(struct hub *hub)
{
	struct hub_redis *r = hub_xcalloc(1, sizeof(*r));

	r->hub = hub;
	r->cmd.r = r;
	r->cmd.name = "commands";
	r->sub.r = r;
	r->sub.name = "pubsub";
	r->sub.is_sub = true;
	return r;
}

int hub_redis_add_script(struct hub_redis *r, const char *lua)
{
	unsigned char md[SHA_DIGEST_LENGTH];

	if (r->nscripts == MAX_SCRIPTS)
		abort();
	SHA1((const unsigned char *)lua, strlen(lua), md);
	for (int i = 0; i < SHA_DIGEST_LENGTH; i++)
		snprintf(&r->shas[r->nscripts][i * 2], 3, "%02x", md[i]);
	r->scripts[r->nscripts] = lua;
	return r->nscripts++;
}

const char *hub_redis_script_sha(const struct hub_redis *r, int idx)
{
	return r->shas[idx];
}

void hub_resp_head(hub_buf *b, size_t argc)
{
	hub_buf_reserve(b, 32);
	b->data[b->len++] = '*';
	b->len += hub_fmt_i64(b->data + b->len, (int64_t)argc);
	b->data[b->len++] = '\r';
	b->data[b->len++] = '\n';
}

void hub_resp_arg(hub_buf *b, const char *p, size_t n)
{
	hub_buf_reserve(b, n + 32);
	b->data[b->len++] = '$';
	b->len += hub_fmt_i64(b->data + b->len, (int64_t)n);
	b->data[b->len++] = '\r';
	b->data[b->len++] = '\n';
	memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len++] = '\r';
	b->data[b->len++] = '\n';
}

void hub_resp_str(hub_buf *b, const char *s)
{
	hub_resp_arg(b, s, strlen(s));
}

void hub_resp_int(hub_buf *b, int64_t v)
{
	char num[24];

	hub_resp_arg(b, num, hub_fmt_i64(num, v));
}

void hub_resp_evalsha(hub_buf *b, const struct hub_redis *r, int script, size_t nkeys)
{
	hub_resp_arg(b, "EVALSHA", 7);
	hub_resp_arg(b, r->shas[script], 40);
	hub_resp_int(b, (int64_t)nkeys);
}

void hub_redis_add_gate(struct hub_redis *r, int argc, const char **argv,
			hub_redis_gate_cb check, void *arg, int recheck_ms)
{
	struct gate *g;

	if (r->ngates == MAX_GATES)
		abort();
	g = &r->gates[r->ngates];
	g->r = r;
	g->idx = r->ngates++;
	g->argv = hub_xcalloc((size_t)argc, sizeof(*g->argv));
	for (int i = 0; i < argc; i++)
		g->argv[i] = hub_xstrdup(argv[i]);
	g->argc = argc;
	g->check = check;
	g->arg = arg;
	g->recheck_ms = recheck_ms;
}

void hub_redis_set_gate(struct hub_redis *r, int argc, const char **argv,
			hub_redis_gate_cb check, void *arg)
{
	hub_redis_add_gate(r, argc, argv, check, arg, 0);
}

void hub_redis_start(struct hub_redis *r)
{
	r->started = true;
	rconn_connect(&r->cmd);
	rconn_connect(&r->sub);
	lws_sul_schedule(r->hub->ctx, 0, &r->sul_watchdog, watchdog_cb, WATCHDOG_US);
}

void hub_redis_set_flush(struct hub_redis *r, void (*fn)(void *), void *arg)
{
	r->flush = fn;
	r->flush_arg = arg;
}

void hub_redis_want_flush(struct hub_redis *r)
{
	if (r->cmd.wsi)
		lws_callback_on_writable(r->cmd.wsi);
}

bool hub_redis_up(const struct hub_redis *r)
{
	const struct rconn *rc;
	int64_t now, allow;

	if (!r || r->cmd.state != RC_UP)
		return false;
	rc = &r->cmd;
	now = hub_mono_us();
	/* A WAIT may hold the connection (and what is queued behind it) for
	 * up to ack-wait-ms without Redis being stalled. */
	allow = STALL_US + (r->wait_inflight ? (int64_t)r->hub->cfg.ack_wait_ms * 1000 : 0);
	if (!rc->ring_len)
		allow += IDLE_PING_US + WATCHDOG_US;
	if (silence_us(rc, now) <= allow)
		return true;
	/* Silent, or is it the hub that was not scheduled (replies waiting in
	 * the socket, unread)? One poll(), only on this path. */
	struct pollfd pfd = { rc->ac ? rc->ac->c.fd : -1, POLLIN, 0 };
	return pfd.fd >= 0 && poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

size_t hub_redis_pending(const struct hub_redis *r)
{
	return r->cmd.ring_len;
}

int hub_redis_command_argv(struct hub_redis *r, hub_redis_cb cb, void *arg,
			   int argc, const char **argv, const size_t *argvlen)
{
	if (r->cmd.state != RC_UP)
		return -1;
	return rconn_send(&r->cmd, cb, arg, argc, argv, argvlen);
}

int hub_redis_command_formatted(struct hub_redis *r, hub_redis_cb cb, void *arg,
				const char *cmd, size_t len)
{
	struct rconn *rc = &r->cmd;

	if (rc->state != RC_UP || !rc->ac)
		return -1;
	if (redisAsyncFormattedCommand(rc->ac, on_reply, rc, cmd, len) != REDIS_OK)
		return -1;
	ring_push(rc, cb, arg);
	return 0;
}

/* ---- replication waits (ack-durability replicated) ------------------------
 * WAIT n ms answers how many replicas have every earlier write of this
 * connection. At most one is in flight: Redis blocks the connection until it
 * answers, so a WAIT per batch would queue one full wait per batch behind a
 * slow replica; one WAIT instead covers every durable command sent before
 * it, and the next is sent when it answers (or right after the command,
 * pipelined, when none is in flight). */

static redisReply *reply_copy(const redisReply *r)
{
	redisReply *c = hub_xcalloc(1, sizeof(*c));

	c->type = r->type;
	c->integer = r->integer;
	if (r->str) {
		c->str = hub_xmalloc(r->len + 1);
		memcpy(c->str, r->str, r->len);
		c->str[r->len] = '\0';
		c->len = r->len;
	}
	if (r->type == REDIS_REPLY_ARRAY && r->elements) {
		c->element = hub_xcalloc(r->elements, sizeof(*c->element));
		c->elements = r->elements;
		for (size_t i = 0; i < r->elements; i++)
			c->element[i] = reply_copy(r->element[i]);
	}
	return c;
}

static void reply_copy_free(redisReply *c)
{
	if (!c)
		return;
	for (size_t i = 0; i < c->elements; i++)
		reply_copy_free(c->element[i]);
	free(c->element);
	free(c->str);
	free(c);
}

/* Runs d's callback once its reply and its WAIT's count are both known:
 * an error reply as is (nothing to acknowledge), a reply with NULL unless
 * enough replicas confirmed. */
static void durable_settle(struct durable *d)
{
	redisReply *rep = d->reply;
	bool ok;

	if (!d->replied || d->wait_n == WAIT_PENDING)
		return;
	ok = rep && (rep->type == REDIS_REPLY_ERROR || d->wait_n >= d->r->hub->cfg.ack_replicas);
	d->cb(ok ? rep : NULL, d->arg);
	reply_copy_free(rep);
	free(d);
}

static void on_durable_reply(redisReply *reply, void *arg)
{
	struct durable *d = arg;

	d->replied = true;
	d->reply = reply ? reply_copy(reply) : NULL;
	durable_settle(d); /* only when its WAIT already failed */
}

static void settle_list(struct durable *d, int n)
{
	while (d) {
		struct durable *next = d->next;
		d->next = NULL;
		d->wait_n = n;
		durable_settle(d);
		d = next;
	}
}

static void send_wait(struct hub_redis *r);

static void on_wait_reply(redisReply *reply, void *arg)
{
	struct hub_redis *r = arg;
	struct durable *list = r->wait_sent;
	int n = reply && reply->type == REDIS_REPLY_INTEGER && reply->integer < INT_MAX ?
		(int)reply->integer : -1;

	r->wait_sent = NULL;
	r->wait_inflight = false;
	if (reply) {
		r->hub->metrics.redis_waits_total++;
		if (n < r->hub->cfg.ack_replicas) {
			int64_t now = hub_mono_us();
			r->hub->metrics.redis_waits_short_total++;
			if (!r->wait_warned_us || now - r->wait_warned_us > WAIT_WARN_US) {
				r->wait_warned_us = now;
				hub_warn("redis: WAIT %d %d: %s%d replicas confirmed; what it covered is "
					 "answered unavailable (counted in iot_hub_redis_waits_short_total)",
					 r->hub->cfg.ack_replicas, r->hub->cfg.ack_wait_ms,
					 n < 0 ? "error, " : "", n < 0 ? 0 : n);
			}
		}
	}
	settle_list(list, n);
	if (r->wait_next)
		send_wait(r);
}

static void send_wait(struct hub_redis *r)
{
	char n[16], ms[16];
	const char *argv[3] = { "WAIT", n, ms };
	struct durable *list = r->wait_next;

	r->wait_next = NULL;
	r->wait_next_tail = &r->wait_next;
	snprintf(n, sizeof(n), "%d", r->hub->cfg.ack_replicas);
	snprintf(ms, sizeof(ms), "%d", r->hub->cfg.ack_wait_ms);
	if (rconn_send(&r->cmd, on_wait_reply, r, 3, argv, NULL)) {
		/* The connection is going: each settles (NULL) with its own reply. */
		settle_list(list, -1);
		return;
	}
	r->wait_sent = list;
	r->wait_inflight = true;
}

int hub_redis_command_durable(struct hub_redis *r, hub_redis_cb cb, void *arg,
			      const char *cmd, size_t len)
{
	struct durable *d;

	if (r->hub->cfg.ack_mode != HUB_ACK_REPLICATED)
		return hub_redis_command_formatted(r, cb, arg, cmd, len);
	d = hub_xcalloc(1, sizeof(*d));
	d->r = r;
	d->cb = cb;
	d->arg = arg;
	d->wait_n = WAIT_PENDING;
	if (hub_redis_command_formatted(r, on_durable_reply, d, cmd, len)) {
		free(d);
		return -1;
	}
	if (!r->wait_next_tail)
		r->wait_next_tail = &r->wait_next;
	*r->wait_next_tail = d;
	r->wait_next_tail = &d->next;
	if (!r->wait_inflight)
		send_wait(r);
	return 0;
}

struct hub_redis_channel *hub_redis_channel_get(struct hub_redis *r, const char *name,
						bool pattern, hub_redis_msg_cb cb,
						hub_redis_state_cb state_cb, void *arg)
{
	struct hub_redis_channel *ch;
	size_t n = strlen(name);

	for (ch = r->channels; ch; ch = ch->next)
		if (ch->pattern == pattern && !strcmp(ch->name, name))
			break;
	if (!ch) {
		ch = hub_xcalloc(1, sizeof(*ch) + n + 1);
		ch->r = r;
		ch->pattern = pattern;
		memcpy(ch->name, name, n + 1);
		ch->next = r->channels;
		r->channels = ch;
	}
	ch->cb = cb;
	ch->state_cb = state_cb;
	ch->arg = arg;
	if (!ch->refs++ && ch->state == CH_IDLE)
		send_subscribe(r, ch);
	return ch;
}

void hub_redis_channel_put(struct hub_redis_channel *ch)
{
	if (ch && !--ch->refs)
		ch->unused_since_us = hub_mono_us();
}

bool hub_redis_channel_active(const struct hub_redis_channel *ch)
{
	return ch && ch->state == CH_ACTIVE;
}

const char *hub_redis_channel_name(const struct hub_redis_channel *ch)
{
	return ch->name;
}

void hub_redis_subscribe(struct hub_redis *r, const char *channel,
			 hub_redis_msg_cb cb, void *arg)
{
	hub_redis_channel_get(r, channel, false, cb, NULL, arg); /* never put */
}

void hub_redis_publish(struct hub_redis *r, const char *channel,
		       const char *payload, size_t len)
{
	const char *argv[3] = { "PUBLISH", channel, payload };
	size_t lens[3] = { 7, strlen(channel), len };

	hub_redis_command_argv(r, NULL, NULL, 3, argv, lens);
}

void hub_redis_stop(struct hub_redis *r)
{
	if (!r || r->stopping)
		return;
	r->stopping = true;
	lws_sul_cancel(&r->sul_watchdog);
	lws_sul_cancel(&r->cmd.sul_reconnect);
	lws_sul_cancel(&r->sub.sul_reconnect);
	lws_sul_cancel(&r->cmd.sul_drop);
	lws_sul_cancel(&r->sub.sul_drop);
	rconn_drop(&r->cmd, "hub stopping");
	rconn_drop(&r->sub, "hub stopping");
}

void hub_redis_free(struct hub_redis *r)
{
	if (!r)
		return;
	for (int g = 0; g < r->ngates; g++) {
		for (int i = 0; i < r->gates[g].argc; i++)
			free(r->gates[g].argv[i]);
		free(r->gates[g].argv);
	}
	while (r->channels) {
		struct hub_redis_channel *next = r->channels->next;
		free(r->channels);
		r->channels = next;
	}
	free(r->cmd.ring);
	free(r->sub.ring);
	free(r);
}
