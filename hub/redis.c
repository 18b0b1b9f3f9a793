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
#include "hub/slot.h"
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
/* Cluster mode: the slot map is read again this often, at least every
 * MAP_DOWN_US while a primary that serves slots is unreachable (waiting
 * for a replica to take over), and at the next watchdog tick after a
 * redirect or a lost node connection. */
#define MAP_REFRESH_US    (5 * 1000 * 1000)
#define MAP_DOWN_US       (500 * 1000)
#define MAX_NODES         256
#define MAX_HOPS          5     /* MOVED/ASK/NOSCRIPT resends of one command */

/* A command awaiting its reply. In cluster mode the command itself is kept
 * (cmd, malloc'd RESP) so that it can be sent again after a redirect
 * (MOVED, ASK) or NOSCRIPT; on one Redis cmd is NULL and nothing is kept. */
struct pending {
	hub_redis_cb cb;
	void *arg;
	int64_t t0;
	char *cmd;
	size_t len;
	int hops;
};

enum rc_state { RC_DOWN, RC_CONNECTING, RC_UP };

/* What a connection is for.
 * SEED: the first connection, to the seed URLs in turn. On one Redis it is
 *   the command connection; on a cluster it reads the slot map (INFO
 *   cluster, CLUSTER SLOTS) and carries nothing else.
 * SUB: classic (P)SUBSCRIBE, to the seeds, in both modes (hiredis's pub/sub).
 * NODE: cluster mode, the command connection of one primary.
 * SSUB: sharded pub/sub (SSUBSCRIBE), one per primary that carries
 *   subscribed channels (on one Redis, one to the seed). hiredis 0.14 knows
 *   nothing of smessage (its async reader asserts on a push it cannot
 *   place), so the bus reads these replies itself (ssub_read). */
enum rc_role { ROLE_SEED, ROLE_SUB, ROLE_NODE, ROLE_SSUB };

struct rnode;
struct durable;

struct rconn {
	struct hub_redis *r;
	const char *name;
	enum rc_role role;
	struct rnode *node;        /* NODE and a cluster's SSUB: the primary it talks to */
	int seed;                  /* the seed it tries next (the seed connections) */
	char host[HUB_REDIS_HOST_MAX]; /* where it connects: a seed's host, as configured */
	int port;
	char addr[INET6_ADDRSTRLEN]; /* host resolved at the last connect */
	bool is_sub;               /* SUB or SSUB */
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
	bool reconnect_pending;    /* sul_reconnect is scheduled */
	struct pending *ring;
	size_t ring_cap, ring_head, ring_len;
	bool stalled;              /* the watchdog saw it silent while RC_UP */
	int gate_idx;              /* the gate whose reply it waits for while connecting */
	int64_t gate_last_us[MAX_GATES];  /* each gate last sent on it */
	unsigned gate_inflight;    /* bit per gate: a recheck awaits its reply */
	/* ack-durability replicated: WAITs on this connection (at most one in
	 * flight: see hub_redis_command_durable). */
	bool wait_inflight;
	struct durable *wait_sent;
	struct durable *wait_next, **wait_next_tail;
};

/* Cluster mode: a primary of the slot map (or one a redirect named). Nodes
 * are kept for the life of the bus; one that serves no slot any more keeps
 * no connection. */
struct rnode {
	char host[HUB_REDIS_HOST_MAX];
	int port;
	int nslots;                /* slots it serves in the current map */
	char name[HUB_REDIS_HOST_MAX + 16];
	char subname[HUB_REDIS_HOST_MAX + 24];
	struct rconn cmd, sub;
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
	bool sharded;              /* SSUBSCRIBE, on conn (hub_redis_schannel_get) */
	struct rconn *conn;        /* sharded: the connection it is (being) subscribed on */
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
	bool cluster;              /* its WAIT goes, after the reply, where it ran */
	int wait_n;                /* replicas the WAIT counted, -1 failed, WAIT_PENDING */
};

struct hub_redis {
	struct hub *hub;
	struct rconn cmd, sub;
	void (*flush)(void *);     /* hub_redis_set_flush: runs before each write */
	void *flush_arg;
	lws_sorted_usec_list_t sul_watchdog;
	int64_t watch_last_us;     /* the watchdog's last run */
	int64_t loop_resumed_us;   /* it last ran late: the loop had stalled */
	bool started, stopping;
	int nscripts;
	const char *scripts[MAX_SCRIPTS];  /* embedded texts (hub_lua.h) */
	char shas[MAX_SCRIPTS][41];
	struct hub_redis_channel *channels;
	int ngates;
	struct gate gates[MAX_GATES];
	struct rconn ssub;         /* one Redis: the sharded pub/sub connection */
	int64_t wait_warned_us;
	void (*fatal)(void *);     /* hub_redis_set_fatal */
	void *fatal_arg;
	bool refused;              /* fatal: no more connects */
	struct rconn *reply_rc;    /* the connection of the reply being delivered */

	/* The mode, learnt from the first seed that answered INFO cluster. */
	bool mode_known;
	bool cluster;
	bool split_test;           /* IOT_HUB_TEST_PER_SLOT=1: hub_redis_split on one Redis */
	/* Cluster mode: the primaries and the slot map (slot -> 1 + index in
	 * nodes, 0 = not served). */
	struct rnode *nodes[MAX_NODES];
	int nnodes;
	uint16_t *slot_node;
	bool map_ok;               /* every slot served */
	bool map_want;             /* refresh at the next watchdog tick */
	bool map_inflight;
	int64_t map_at_us;         /* last refresh asked */
};

static void rconn_connect(struct rconn *rc);
static void rconn_drop(struct rconn *rc, const char *why);
static void sul_reconnect_cb(lws_sorted_usec_list_t *sul);
static void sul_drop_cb(lws_sorted_usec_list_t *sul);
static void send_subscribe(struct hub_redis *r, struct hub_redis_channel *ch);
static void schedule_reconnect(struct rconn *rc);
static void set_state(struct rconn *rc, enum rc_state s);
static void map_refresh(struct hub_redis *r);
static void durable_enqueue(struct rconn *rc, struct durable *d);
static void ssub_lost(struct rconn *rc);
static int rconn_send(struct rconn *rc, hub_redis_cb cb, void *arg, int argc,
		      const char **argv, const size_t *argvlen);

/* since, or the end of the hub's last loop stall if that is later
 * (watchdog_cb sets it): the time before is not Redis's (silence_us). */
static int64_t past_stall(const struct hub_redis *r, int64_t since)
{
	return since > r->loop_resumed_us ? since : r->loop_resumed_us;
}

/* How long a command connection has been silent while it owes a reply
 * (since the last reply, or since the oldest pending command was sent if
 * that is later), or while idle since the last reply. Not counted: the time
 * until the hub's own loop came back from a stall. Commands queued during
 * a long loop turn are written only after it, so the silence Redis was
 * blamed for was the hub's: in a 100,000-gateway storm each hub's turn of
 * 14,000 closes took 2-3 s, and right after it the connection was dropped
 * as "no reply for 2000 ms", failing every pending call. */
static int64_t silence_us(const struct rconn *rc, int64_t now)
{
	int64_t since = rc->last_reply_us;

	if (rc->ring_len && rc->ring[rc->ring_head].t0 > since)
		since = rc->ring[rc->ring_head].t0;
	return now - past_stall(rc->r, since);
}

/* ---- the pending ring ---------------------------------------------------- */

static void ring_push_cmd(struct rconn *rc, hub_redis_cb cb, void *arg, char *cmd, size_t len,
			  int hops)
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
	p->cmd = cmd;
	p->len = len;
	p->hops = hops;
	rc->ring_len++;
}

static void ring_push(struct rconn *rc, hub_redis_cb cb, void *arg)
{
	ring_push_cmd(rc, cb, arg, NULL, 0, 0);
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

/* ---- cluster mode: nodes and the slot map --------------------------------- */

static bool rconn_wanted(const struct rconn *rc);

static void rconn_init(struct rconn *rc, struct hub_redis *r, const char *name,
		       enum rc_role role, struct rnode *node)
{
	rc->r = r;
	rc->name = name;
	rc->role = role;
	rc->node = node;
	rc->is_sub = role == ROLE_SUB || role == ROLE_SSUB;
	rc->wait_next_tail = &rc->wait_next;
}

/* The node at host:port, created (not connected) if new. Returns its index,
 * or -1 when MAX_NODES are known already. */
static int node_get(struct hub_redis *r, const char *host, int port)
{
	struct rnode *n;

	for (int i = 0; i < r->nnodes; i++)
		if (r->nodes[i]->port == port && !strcmp(r->nodes[i]->host, host))
			return i;
	if (r->nnodes == MAX_NODES)
		return -1;
	n = hub_xcalloc(1, sizeof(*n));
	snprintf(n->host, sizeof(n->host), "%s", host);
	n->port = port;
	snprintf(n->name, sizeof(n->name), "%s:%d", host, port);
	snprintf(n->subname, sizeof(n->subname), "%s:%d pubsub", host, port);
	rconn_init(&n->cmd, r, n->name, ROLE_NODE, n);
	rconn_init(&n->sub, r, n->subname, ROLE_SSUB, n);
	r->nodes[r->nnodes] = n;
	return r->nnodes++;
}

static struct rnode *slot_owner(const struct hub_redis *r, unsigned slot)
{
	unsigned i = r->slot_node ? r->slot_node[slot] : 0;

	return i ? r->nodes[i - 1] : NULL;
}

/* A connected primary, for a command that has no key. */
static struct rconn *any_node_up(struct hub_redis *r)
{
	for (int i = 0; i < r->nnodes; i++)
		if (r->nodes[i]->nslots && r->nodes[i]->cmd.state == RC_UP)
			return &r->nodes[i]->cmd;
	return NULL;
}

/* Makes the map m (HUB_SLOTS entries, 1 + node index) the current one and
 * connects the primaries it names; logs it when it changed. */
static void map_apply(struct hub_redis *r, const uint16_t *m)
{
	bool changed = memcmp(r->slot_node, m, HUB_SLOTS * sizeof(*m)) != 0;
	int unserved = 0;

	memcpy(r->slot_node, m, HUB_SLOTS * sizeof(*m));
	for (int i = 0; i < r->nnodes; i++)
		r->nodes[i]->nslots = 0;
	for (unsigned s = 0; s < HUB_SLOTS; s++) {
		if (m[s])
			r->nodes[m[s] - 1]->nslots++;
		else
			unserved++;
	}
	r->map_ok = !unserved;
	if (changed) {
		char list[1024];
		size_t off = 0;
		int np = 0;

		list[0] = '\0';
		for (int i = 0; i < r->nnodes; i++) {
			if (!r->nodes[i]->nslots)
				continue;
			np++;
			if (off < sizeof(list))
				off += (size_t)snprintf(list + off, sizeof(list) - off, "%s%s (%d slots)",
							off ? ", " : "", r->nodes[i]->name,
							r->nodes[i]->nslots);
		}
		hub_info("redis cluster: slot map: %d primaries: %s%s", np, list,
			 unserved ? "; some slots are served by no primary" : "");
	}
	for (int i = 0; i < r->nnodes; i++) {
		struct rnode *n = r->nodes[i];

		if (n->nslots && !n->cmd.ac && !n->cmd.reconnect_pending)
			rconn_connect(&n->cmd);
	}
}

/* CLUSTER SLOTS: [[start, end, [host, port, id, ...], replicas...], ...].
 * An empty host (or "?") means "the address you reached me at". */
static void on_slots_reply(redisReply *reply, void *arg)
{
	struct rconn *rc = arg;
	struct hub_redis *r = rc->r;
	uint16_t *m;

	r->map_inflight = false;
	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		if (reply)
			hub_warn("redis %s: CLUSTER SLOTS: %s", rc->name,
				 reply->type == REDIS_REPLY_ERROR ? reply->str : "unexpected reply");
		r->map_want = true;
		return;
	}
	r->hub->metrics.redis_map_refreshes_total++;
	m = hub_xcalloc(HUB_SLOTS, sizeof(*m));
	for (size_t i = 0; i < reply->elements; i++) {
		const redisReply *e = reply->element[i], *nd;
		const char *host;
		int idx;

		if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 ||
		    e->element[0]->type != REDIS_REPLY_INTEGER ||
		    e->element[1]->type != REDIS_REPLY_INTEGER ||
		    (nd = e->element[2])->type != REDIS_REPLY_ARRAY || nd->elements < 2 ||
		    nd->element[0]->type != REDIS_REPLY_STRING ||
		    nd->element[1]->type != REDIS_REPLY_INTEGER)
			continue;
		host = nd->element[0]->str;
		if (!*host || !strcmp(host, "?"))
			host = rc->host;
		idx = node_get(r, host, (int)nd->element[1]->integer);
		if (idx < 0)
			continue;
		for (long long s = e->element[0]->integer; s <= e->element[1]->integer; s++)
			if (s >= 0 && s < HUB_SLOTS)
				m[s] = (uint16_t)(idx + 1);
	}
	map_apply(r, m);
	free(m);
}

/* Asks for the slot map on the seed connection, or on any connected
 * primary when the seed connection is down (the seed itself may be the
 * node that died). */
static void map_refresh(struct hub_redis *r)
{
	const char *argv[2] = { "CLUSTER", "SLOTS" };
	struct rconn *rc = r->cmd.state == RC_UP ? &r->cmd : any_node_up(r);

	if (r->map_inflight || !rc)
		return;
	r->map_want = false;
	r->map_at_us = hub_mono_us();
	if (!rconn_send(rc, on_slots_reply, rc, 2, argv, NULL))
		r->map_inflight = true;
}

/* ---- replies, and resending after a redirect ----------------------------- */

/* The script an EVALSHA in RESP form calls, or -1. */
static int script_of(const struct hub_redis *r, const char *cmd, size_t len)
{
	const char *p = memchr(cmd, '\n', len), *end = cmd + len;

	/* *N\r\n $7\r\nEVALSHA\r\n $40\r\n<sha>\r\n */
	if (!p || end - p < 1 + 13 + 5 + 40 || strncasecmp(p + 1, "$7\r\nEVALSHA\r\n$40\r\n", 18))
		return -1;
	p += 1 + 18;
	for (int i = 0; i < r->nscripts; i++)
		if (!memcmp(p, r->shas[i], 40))
			return i;
	return -1;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata);

/* Sends p's command again on rc (ASKING first when asking). 1: sent, the
 * callback is now rc's; 0: could not (the caller answers the callback). */
static int resend(struct rconn *rc, struct pending *p, bool asking)
{
	if (!rc->ac && !rc->r->stopping)
		rconn_connect(rc);
	if (!rc->ac || rc->state == RC_DOWN)
		return 0;
	if (asking) {
		const char *argv[1] = { "ASKING" };

		if (rconn_send(rc, NULL, NULL, 1, argv, NULL))
			return 0;
	}
	if (redisAsyncFormattedCommand(rc->ac, on_reply, rc, p->cmd, p->len) != REDIS_OK)
		return 0;
	ring_push_cmd(rc, p->cb, p->arg, p->cmd, p->len, p->hops + 1);
	return 1;
}

/* Cluster mode, an error reply to a command whose text was kept: MOVED
 * (the slot has a new owner: note it, read the whole map soon, send it
 * there), ASK (the slot is migrating and this key already moved: ASKING +
 * the command to the target, once; the map is not changed) or NOSCRIPT
 * (the node lost its scripts: SCRIPT LOAD, then the command again, on the
 * same connection). Returns 1 when resent, 0 to answer with the error,
 * -1 to answer NULL (the node to resend to is unreachable). */
static int cluster_retry(struct rconn *rc, struct pending *p, const redisReply *rep)
{
	struct hub_redis *r = rc->r;
	char host[HUB_REDIS_HOST_MAX];
	int slot, port, kind, idx;

	if (p->hops >= MAX_HOPS)
		return 0;
	kind = hub_parse_redirect(rep->str, rep->len, &slot, host, sizeof(host), &port);
	if (kind) {
		if (!*host)
			snprintf(host, sizeof(host), "%s", rc->host);
		idx = node_get(r, host, port);
		if (idx < 0)
			return 0;
		if (kind == 1) {
			r->hub->metrics.redis_moved_total++;
			if (r->slot_node) {
				struct rnode *old = slot_owner(r, (unsigned)slot);

				if (old)
					old->nslots--;
				r->slot_node[slot] = (uint16_t)(idx + 1);
				r->nodes[idx]->nslots++;
			}
			r->map_want = true;
		} else {
			r->hub->metrics.redis_ask_total++;
		}
		return resend(&r->nodes[idx]->cmd, p, kind == 2) ? 1 : -1;
	}
	if (rep->len >= 8 && !memcmp(rep->str, "NOSCRIPT", 8)) {
		int s = script_of(r, p->cmd, p->len);
		const char *argv[3] = { "SCRIPT", "LOAD", NULL };

		if (s < 0)
			return 0;
		argv[2] = r->scripts[s];
		if (rconn_send(rc, NULL, NULL, 3, argv, NULL))
			return -1;
		return resend(rc, p, false) ? 1 : -1;
	}
	if ((rep->len >= 11 && !memcmp(rep->str, "CLUSTERDOWN", 11)) ||
	    (rep->len >= 8 && !memcmp(rep->str, "TRYAGAIN", 8)))
		r->map_want = true;
	return 0;
}

/* hiredis calls this for every reply on a ring-tracked command, in order. */
static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct rconn *rc = privdata;
	struct pending p;
	redisReply *rep = reply;
	int retry = 0;

	(void)ac;
	if (!ring_pop(rc, &p)) {
		hub_err("redis %s: reply with no pending command", rc->name);
		return;
	}
	int64_t now = hub_mono_us();
	if (rep) {
		rc->last_reply_us = now;
		hub_hist_observe(&rc->r->hub->metrics.redis_rtt, (double)(now - p.t0) / 1e6);
		if (rep->type == REDIS_REPLY_ERROR && p.cmd) {
			retry = cluster_retry(rc, &p, rep);
			if (retry > 0)
				return; /* p.cmd and the callback moved on with it */
		}
		if (rep->type == REDIS_REPLY_ERROR)
			rc->r->hub->metrics.redis_errors_total++;
	}
	free(p.cmd);
	rc->r->reply_rc = rc;
	if (p.cb)
		p.cb(retry < 0 ? NULL : rep, p.arg);
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

/* Cluster mode: sends cmd (RESP, malloc'd; owned from here on) to the
 * primary of slot (or any primary for HUB_REDIS_SLOT_ANY) and keeps it for
 * a resend. -1 when that primary is not connected (cmd freed, cb not
 * called). */
static int cluster_send(struct hub_redis *r, int slot, hub_redis_cb cb, void *arg,
			char *cmd, size_t len)
{
	struct rconn *rc;
	struct rnode *n;

	if (slot >= 0)
		rc = (n = slot_owner(r, (unsigned)slot)) ? &n->cmd : NULL;
	else
		rc = any_node_up(r);
	if (!rc || rc->state != RC_UP || !rc->ac ||
	    redisAsyncFormattedCommand(rc->ac, on_reply, rc, cmd, len) != REDIS_OK) {
		free(cmd);
		return -1;
	}
	ring_push_cmd(rc, cb, arg, cmd, len, 0);
	return 0;
}

/* ---- sharded pub/sub, read by the bus ------------------------------------ */

/* Appends a command to an SSUB connection's output (no hiredis callback:
 * its replies are read by ssub_read). */
static void ssub_send(struct rconn *rc, int argc, const char **argv)
{
	if (!rc->ac)
		return;
	redisAppendCommandArgv(&rc->ac->c, argc, argv, NULL);
	if (rc->wsi)
		lws_callback_on_writable(rc->wsi);
}

static struct hub_redis_channel *schannel_find(struct hub_redis *r, const char *name, size_t n)
{
	for (struct hub_redis_channel *ch = r->channels; ch; ch = ch->next)
		if (ch->sharded && strlen(ch->name) == n && !memcmp(ch->name, name, n))
			return ch;
	return NULL;
}

static void channel_set_state(struct hub_redis_channel *ch, enum ch_state s);

/* One reply on an SSUB connection: smessage, ssubscribe / sunsubscribe
 * confirmations (Redis also sends sunsubscribe by itself when the slot
 * moved away from the node), an error (MOVED: the map was stale). */
static void ssub_reply(struct rconn *rc, const redisReply *rep)
{
	struct hub_redis *r = rc->r;
	struct hub_redis_channel *ch;
	const char *kind;

	rc->last_reply_us = hub_mono_us();
	if (rep->type == REDIS_REPLY_ERROR) {
		char host[HUB_REDIS_HOST_MAX];
		int slot, port, idx;

		if (hub_parse_redirect(rep->str, rep->len, &slot, host, sizeof(host), &port) != 1) {
			hub_warn("redis %s: %s", rc->name, rep->str);
			return;
		}
		/* A channel of that slot was sent to the wrong node: it goes
		 * back to idle and the sweep subscribes it where MOVED says. */
		r->hub->metrics.redis_moved_total++;
		r->map_want = true;
		if (!*host)
			snprintf(host, sizeof(host), "%s", rc->host);
		idx = node_get(r, host, port);
		if (idx >= 0 && r->slot_node)
			r->slot_node[slot] = (uint16_t)(idx + 1);
		for (ch = r->channels; ch; ch = ch->next)
			if (ch->sharded && ch->conn == rc && ch->state == CH_SUBSCRIBING &&
			    hub_slot(ch->name, strlen(ch->name)) == (unsigned)slot) {
				ch->conn = NULL;
				channel_set_state(ch, CH_IDLE);
			}
		return;
	}
	if (rep->type != REDIS_REPLY_ARRAY || rep->elements < 3 ||
	    rep->element[0]->type != REDIS_REPLY_STRING ||
	    rep->element[1]->type != REDIS_REPLY_STRING)
		return; /* pong */
	kind = rep->element[0]->str;
	ch = schannel_find(r, rep->element[1]->str, rep->element[1]->len);
	if (!ch)
		return;
	if (!strcmp(kind, "smessage")) {
		if (rep->element[2]->type == REDIS_REPLY_STRING && ch->state == CH_ACTIVE &&
		    ch->conn == rc)
			ch->cb(ch->name, rep->element[2]->str, rep->element[2]->len, ch->arg);
	} else if (!strcmp(kind, "ssubscribe")) {
		if (ch->conn == rc && ch->state == CH_SUBSCRIBING)
			channel_set_state(ch, CH_ACTIVE);
	} else if (!strcmp(kind, "sunsubscribe")) {
		if (ch->conn != rc)
			return;
		ch->conn = NULL;
		if (ch->state == CH_ACTIVE && ch->refs)
			r->map_want = true; /* Redis dropped it: the slot moved */
		channel_set_state(ch, CH_IDLE);
		if (ch->refs)
			send_subscribe(r, ch);
	}
}

/* Readable SSUB connection: everything hiredis buffered, reply by reply. */
static void ssub_read(struct rconn *rc)
{
	void *rep;

	if (redisBufferRead(&rc->ac->c) != REDIS_OK) {
		rconn_drop(rc, rc->ac->c.errstr[0] ? rc->ac->c.errstr : "connection lost");
		return;
	}
	while (rc->ac && redisGetReplyFromReader(&rc->ac->c, &rep) == REDIS_OK && rep) {
		ssub_reply(rc, rep);
		freeReplyObject(rep);
	}
	if (rc->ac && rc->ac->c.err)
		rconn_drop(rc, "bad reply");
}

/* Its channels are no longer subscribed anywhere. */
static void ssub_lost(struct rconn *rc)
{
	for (struct hub_redis_channel *ch = rc->r->channels; ch; ch = ch->next)
		if (ch->sharded && ch->conn == rc) {
			ch->conn = NULL;
			channel_set_state(ch, CH_IDLE);
		}
}

/* The connection a sharded channel belongs on now, or NULL (mode or map
 * not known yet, slot not served). */
static struct rconn *schannel_conn(struct hub_redis *r, const char *name)
{
	struct rnode *n;

	if (!r->mode_known)
		return NULL;
	if (!r->cluster)
		return &r->ssub;
	n = slot_owner(r, hub_slot(name, strlen(name)));
	return n ? &n->sub : NULL;
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
				if (rc->role == ROLE_SSUB && (rc->ac->c.flags & REDIS_CONNECTED))
					ssub_read(rc);
				else
					redisAsyncHandleRead(rc->ac);
			} else {
				if (rc->r->flush && (rc->role == ROLE_NODE ||
						     (rc->role == ROLE_SEED && !rc->r->cluster)))
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

/* Whether the bus wants rc connected: a primary's command connection while
 * it serves slots, its SSUB connection while it carries channels. */
static bool rconn_wanted(const struct rconn *rc)
{
	struct hub_redis *r = rc->r;

	if (r->stopping || r->refused)
		return false;
	if (rc->role == ROLE_NODE)
		return rc->node->nslots > 0;
	if (rc->role == ROLE_SSUB) {
		for (struct hub_redis_channel *ch = r->channels; ch; ch = ch->next)
			if (ch->sharded && (ch->refs || ch->state != CH_IDLE) &&
			    schannel_conn(r, ch->name) == rc)
				return true;
		return false;
	}
	return true;
}

static void schedule_reconnect(struct rconn *rc)
{
	struct hub_redis *r = rc->r;

	if (!rconn_wanted(rc))
		return;
	int ms = rc->backoff_ms ? rc->backoff_ms : BACKOFF_MIN_MS;
	int jitter = ms / 4 ? rand() % (ms / 4 + 1) : 0;
	rc->backoff_ms = ms * 2 > r->hub->cfg.redis_backoff_max_ms ?
			 r->hub->cfg.redis_backoff_max_ms : ms * 2;
	rc->reconnect_pending = true;
	lws_sul_schedule(r->hub->ctx, 0, &rc->sul_reconnect,
			 sul_reconnect_cb, (lws_usec_t)(ms + jitter) * 1000);
}

static void bus_fatal(struct hub_redis *r)
{
	r->refused = true;
	if (r->fatal)
		r->fatal(r->fatal_arg);
}

static void drop_soon(struct rconn *rc, const char *why)
{
	/* Not from inside hiredis: drop on a timer. */
	rc->drop_why = why;
	lws_sul_schedule(rc->r->hub->ctx, 0, &rc->sul_drop, sul_drop_cb, 1);
}

static void on_setup_reply(redisReply *reply, void *arg)
{
	struct rconn *rc = arg;

	if (reply && reply->type == REDIS_REPLY_ERROR) {
		hub_err("redis %s: setup command failed: %s", rc->name, reply->str);
		drop_soon(rc, NULL);
	}
}

static void gate_refused(struct rconn *rc)
{
	drop_soon(rc, "refused by the connect check");
}

static void on_gate_reply(redisReply *reply, void *arg)
{
	struct rconn *rc = arg;
	struct hub_redis *r = rc->r;
	struct gate *g = &r->gates[rc->gate_idx];

	if (!reply || rc->state != RC_CONNECTING)
		return; /* lost meanwhile: the next connection asks again */
	if (!g->check(reply, g->arg)) {
		gate_refused(rc);
		return;
	}
	if (g->idx < r->ngates - 1) {
		/* One after the other: a gate that refuses stops the next ones
		 * (the layout script writes) from running at all. */
		struct gate *next = &r->gates[g->idx + 1];
		rc->gate_idx = next->idx;
		rc->gate_last_us[next->idx] = hub_mono_us();
		if (rconn_send(rc, on_gate_reply, rc, next->argc, (const char **)next->argv, NULL))
			gate_refused(rc);
		return;
	}
	set_state(rc, RC_UP);
	rc->backoff_ms = 0;
}

/* A recheck's reply: which gate is in the low bits of the pointer-sized
 * tag would be clever; a small struct per (connection, gate) is plainer. */
struct recheck {
	struct rconn *rc;
	int idx;
};

static void on_recheck_reply(redisReply *reply, void *arg)
{
	struct recheck *k = arg;
	struct rconn *rc = k->rc;
	struct gate *g = &rc->r->gates[k->idx];

	rc->gate_inflight &= ~(1u << k->idx);
	free(k);
	if (reply && rc->state == RC_UP && !g->check(reply, g->arg))
		gate_refused(rc);
}

/* What a command connection sends before anything else, after AUTH:
 * SELECT (one Redis), the scripts, then the gates one by one; it is up
 * when the last gate passed (at once without gates). */
static void cmd_setup(struct rconn *rc)
{
	struct hub_redis *r = rc->r;
	struct hub_config *cfg = &r->hub->cfg;

	if (rc->role == ROLE_SEED && cfg->redis_db) {
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
		rc->gate_idx = 0;
		rc->gate_last_us[0] = hub_mono_us();
		rconn_send(rc, on_gate_reply, rc, r->gates[0].argc,
			   (const char **)r->gates[0].argv, NULL);
		return;
	}
	set_state(rc, RC_UP);
	rc->backoff_ms = 0;
}

/* INFO cluster on the seed connection tells the mode: one Redis (the seed
 * connection becomes the command connection) or a cluster (it reads the
 * slot map, and each primary gets a command connection of its own). */
static void on_probe_reply(redisReply *reply, void *arg)
{
	struct rconn *rc = arg;
	struct hub_redis *r = rc->r;
	const struct hub_config *cfg = &r->hub->cfg;
	bool cluster;

	if (!reply || rc->state != RC_CONNECTING)
		return;
	cluster = reply->type == REDIS_REPLY_STRING && strstr(reply->str, "cluster_enabled:1");
	if (r->mode_known && cluster != r->cluster) {
		hub_err("redis %s: %s:%d is %s, but this hub started on %s: not running on both",
			rc->name, rc->host, rc->port, cluster ? "a cluster node" : "not a cluster node",
			r->cluster ? "a cluster" : "one Redis");
		bus_fatal(r);
		drop_soon(rc, "mode changed");
		return;
	}
	if (cluster && cfg->redis_db) {
		hub_err("redis: %s:%d is a Redis Cluster node: database %d (/%d in the URL) is refused "
			"(a cluster has database 0 only)", rc->host, rc->port, cfg->redis_db,
			cfg->redis_db);
		bus_fatal(r);
		drop_soon(rc, "database refused");
		return;
	}
	if (!r->mode_known && cluster)
		hub_info("redis: %s:%d is a Redis Cluster node: cluster mode", rc->host, rc->port);
	r->mode_known = true;
	r->cluster = cluster;
	if (!cluster) {
		cmd_setup(rc);
		return;
	}
	if (!r->slot_node)
		r->slot_node = hub_xcalloc(HUB_SLOTS, sizeof(*r->slot_node));
	set_state(rc, RC_UP);
	rc->backoff_ms = 0;
	map_refresh(r);
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
		if (rc->role == ROLE_NODE)
			rc->r->map_want = true;
		schedule_reconnect(rc);
		return;
	}
	if (strcmp(rc->host, rc->addr))
		hub_info("redis %s: connected to %s:%d (%s)", rc->name, rc->host, rc->port,
			 rc->addr);
	else
		hub_info("redis %s: connected to %s:%d", rc->name, rc->host, rc->port);
	rc->last_reply_us = hub_mono_us();
	if (rc->role == ROLE_SEED || (rc->role == ROLE_NODE && rc->r->ngates))
		return; /* up after INFO cluster (on_probe_reply) or the gates */
	set_state(rc, RC_UP);
	rc->backoff_ms = 0;
	for (struct hub_redis_channel *ch = rc->r->channels; ch; ch = ch->next)
		if (ch->refs && ch->sharded == (rc->role == ROLE_SSUB) &&
		    (!ch->sharded || schannel_conn(rc->r, ch->name) == rc))
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
	if (rc->role == ROLE_SSUB)
		ssub_lost(rc);
	if (rc->role == ROLE_NODE)
		rc->r->map_want = true;
	schedule_reconnect(rc);
}

static void channel_set_state(struct hub_redis_channel *ch, enum ch_state s)
{
	bool was = ch->state == CH_ACTIVE;

	ch->state = s;
	if (ch->state_cb && was != (s == CH_ACTIVE))
		ch->state_cb(ch, s == CH_ACTIVE, ch->arg);
}

/* Every reply for a classic channel: (p)subscribe confirmations, messages,
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

static void send_ssubscribe(struct hub_redis *r, struct hub_redis_channel *ch)
{
	struct rconn *rc = schannel_conn(r, ch->name);
	const char *argv[2] = { "SSUBSCRIBE", ch->name };

	if (!rc)
		return; /* the sweep tries again once the map says where */
	if (!rc->ac && !rc->reconnect_pending) {
		rconn_connect(rc); /* subscribes from on_connect */
		return;
	}
	if (rc->state != RC_UP)
		return;
	ssub_send(rc, 2, argv);
	ch->conn = rc;
	channel_set_state(ch, CH_SUBSCRIBING);
}

static void send_subscribe(struct hub_redis *r, struct hub_redis_channel *ch)
{
	const char *argv[2] = { ch->pattern ? "PSUBSCRIBE" : "SUBSCRIBE", ch->name };

	if (ch->sharded) {
		send_ssubscribe(r, ch);
		return;
	}
	if (r->sub.ac && r->sub.state == RC_UP &&
	    redisAsyncCommandArgv(r->sub.ac, on_sub_message, ch, 2, argv, NULL) == REDIS_OK)
		channel_set_state(ch, CH_SUBSCRIBING);
}

static void send_unsubscribe(struct hub_redis *r, struct hub_redis_channel *ch)
{
	const char *argv[2] = { ch->pattern ? "PUNSUBSCRIBE" : "UNSUBSCRIBE", ch->name };

	if (ch->sharded) {
		argv[0] = "SUNSUBSCRIBE";
		if (ch->conn && ch->conn->ac && ch->conn->state == RC_UP) {
			ssub_send(ch->conn, 2, argv);
			channel_set_state(ch, CH_UNSUBSCRIBING);
		}
		return;
	}
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

/* Where rc connects: a primary's connections to that primary; the seed
 * connections to the seed URLs in turn (the next one after each connect
 * that failed), then, on a cluster, to the primaries the map named (the
 * seeds may all be gone after failovers). */
static void rconn_target(struct rconn *rc)
{
	const struct hub_redis *r = rc->r;
	const struct hub_config *cfg = &r->hub->cfg;
	int n = cfg->redis_nseeds + (r->cluster ? r->nnodes : 0);
	int i = rc->seed % n;

	if (rc->node) {
		snprintf(rc->host, sizeof(rc->host), "%s", rc->node->host);
		rc->port = rc->node->port;
	} else if (i < cfg->redis_nseeds) {
		snprintf(rc->host, sizeof(rc->host), "%s", cfg->redis_seeds[i].host);
		rc->port = cfg->redis_seeds[i].port;
	} else {
		snprintf(rc->host, sizeof(rc->host), "%s", r->nodes[i - cfg->redis_nseeds]->host);
		rc->port = r->nodes[i - cfg->redis_nseeds]->port;
	}
}

static void rconn_connect(struct rconn *rc)
{
	struct hub_redis *r = rc->r;
	struct hub_config *cfg = &r->hub->cfg;
	redisAsyncContext *ac;
	lws_sock_file_fd_type fd;
	int grc;

	if (rc->ac || !rconn_wanted(rc))
		return;
	rc->reconnect_pending = false;
	lws_sul_cancel(&rc->sul_reconnect);
	rconn_target(rc);
	grc = resolve(rc->host, rc->addr, sizeof(rc->addr));
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
	if (rc->role == ROLE_SEED || rc->role == ROLE_NODE)
		r->hub->metrics.redis_reconnects_total++;

	/* Pipelined ahead of anything else; replies come in order. */
	if (rc->role == ROLE_SSUB) {
		if (cfg->redis_password) {
			const char *argv[2] = { "AUTH", cfg->redis_password };
			ssub_send(rc, 2, argv);
		}
		return;
	}
	if (cfg->redis_password) {
		const char *argv[2] = { "AUTH", cfg->redis_password };
		rconn_send(rc, on_setup_reply, rc, 2, argv, NULL);
	}
	if (rc->role == ROLE_SEED) {
		const char *argv[2] = { "INFO", "cluster" };
		rconn_send(rc, on_probe_reply, rc, 2, argv, NULL);
	} else if (rc->role == ROLE_NODE) {
		cmd_setup(rc);
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
	while (ring_pop(rc, &p)) {
		free(p.cmd);
		if (p.cb)
			p.cb(NULL, p.arg);
	}
	ev_cleanup(rc);
	if (rc->role == ROLE_SSUB)
		ssub_lost(rc);
	if (rc->role == ROLE_NODE)
		rc->r->map_want = true;
	schedule_reconnect(rc);
}

static void sul_reconnect_cb(lws_sorted_usec_list_t *sul)
{
	struct rconn *rc = lws_container_of(sul, struct rconn, sul_reconnect);

	rc->reconnect_pending = false;
	rconn_connect(rc);
}

static void sul_drop_cb(lws_sorted_usec_list_t *sul)
{
	struct rconn *rc = lws_container_of(sul, struct rconn, sul_drop);
	const char *why = rc->drop_why ? rc->drop_why : "socket closed or setup failed";

	rc->drop_why = NULL;
	rconn_drop(rc, why);
}

/* Silent, or is it the hub that was not scheduled (replies waiting in the
 * socket, unread)? One poll(), only on the paths that suspect Redis. */
static bool replies_unread(const struct rconn *rc)
{
	struct pollfd pfd = { rc->ac ? rc->ac->c.fd : -1, POLLIN, 0 };

	return pfd.fd >= 0 && poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

/* How long a WAIT in flight (ack-durability replicated) may hold rc, and
 * what is queued behind it, without Redis being stalled or behind. */
static int64_t wait_allow_us(const struct rconn *rc)
{
	return rc->wait_inflight ? (int64_t)rc->r->hub->cfg.ack_wait_ms * 1000 : 0;
}

/* Up means answering: see hub_redis_up(). */
static bool rconn_answering(const struct rconn *rc, int64_t now)
{
	int64_t allow;

	if (rc->state != RC_UP)
		return false;
	/* A WAIT may hold the connection (and what is queued behind it) for
	 * up to ack-wait-ms without Redis being stalled. */
	allow = STALL_US + wait_allow_us(rc);
	if (!rc->ring_len)
		allow += IDLE_PING_US + WATCHDOG_US;
	if (silence_us(rc, now) <= allow)
		return true;
	return replies_unread(rc);
}

/* The watchdog's work on a command connection (the seed connection, a
 * primary's): connect and reply deadlines, a PING when idle, the "not
 * answering" log, gate rechecks. */
static void watch_cmd(struct rconn *rc, int64_t now)
{
	struct hub_redis *r = rc->r;
	int64_t timeout = (int64_t)r->hub->cfg.redis_timeout_ms * 1000;
	bool pair = rc->role == ROLE_SEED && !r->cluster; /* the pub/sub goes with it */

	if (rc->state == RC_CONNECTING && now - past_stall(r, rc->state_since_us) > timeout) {
		rconn_drop(rc, "connect timed out");
		if (pair)
			rconn_drop(&r->sub, "command connection timed out");
	} else if (rc->state == RC_UP && rc->ring_len && silence_us(rc, now) > timeout &&
		   !replies_unread(rc)) {
		/* No reply to anything for redis-timeout-ms. Not the age of the
		 * oldest command: a Redis working through a deep queue (a
		 * reconnect storm: thousands of connect and announce scripts)
		 * keeps replying, and dropping it failed every pending command,
		 * whose gateways resent them: a collapse, not a recovery
		 * (bench/results/2026-12-06-w1-100k.md). */
		char why[96];
		snprintf(why, sizeof(why), "no reply for %d ms (%zu commands pending)",
			 r->hub->cfg.redis_timeout_ms, rc->ring_len);
		rconn_drop(rc, why);
		if (pair)
			rconn_drop(&r->sub, "command connection stalled");
	} else if (rc->state == RC_UP && !rc->ring_len &&
		   now - rc->last_reply_us > IDLE_PING_US) {
		const char *argv[1] = { "PING" };
		rconn_send(rc, NULL, NULL, 1, argv, NULL);
	}
	if (rc->state != RC_UP) {
		rc->stalled = false;
		return;
	}
	bool up = rconn_answering(rc, now);
	if (!up && !rc->stalled)
		hub_warn("redis %s: no reply for %lld ms (%zu commands pending): counted as "
			 "down (not ready, telemetry answered unavailable) until it answers",
			 rc->name, (long long)silence_us(rc, now) / 1000, rc->ring_len);
	else if (up && rc->stalled)
		hub_info("redis %s: answering again", rc->name);
	rc->stalled = !up;
	if (rc->role == ROLE_SEED && r->cluster)
		return; /* the map reader runs no gates */
	for (int i = 0; i < r->ngates; i++) {
		struct gate *g = &r->gates[i];
		struct recheck *k;

		if (!g->recheck_ms || (rc->gate_inflight & (1u << i)) ||
		    now - rc->gate_last_us[i] < (int64_t)g->recheck_ms * 1000)
			continue;
		k = hub_xmalloc(sizeof(*k));
		k->rc = rc;
		k->idx = i;
		if (rconn_send(rc, on_recheck_reply, k, g->argc, (const char **)g->argv, NULL)) {
			free(k);
			continue;
		}
		rc->gate_inflight |= 1u << i;
		rc->gate_last_us[i] = now;
	}
}

static void watch_sub(struct rconn *rc, int64_t now)
{
	int64_t timeout = (int64_t)rc->r->hub->cfg.redis_timeout_ms * 1000;

	if (rc->state == RC_CONNECTING && now - rc->state_since_us > timeout)
		rconn_drop(rc, "connect timed out");
}

/* Cluster mode: keep the map fresh, and let go of primaries that serve
 * nothing any more once their last reply came. */
static void watch_cluster(struct hub_redis *r, int64_t now)
{
	bool down = false;

	for (int i = 0; i < r->nnodes; i++) {
		struct rnode *n = r->nodes[i];

		if (n->nslots && n->cmd.state != RC_UP)
			down = true;
		if (!n->nslots && n->cmd.ac && !n->cmd.ring_len)
			rconn_drop(&n->cmd, "serves no slot any more");
		if (n->sub.ac && !rconn_wanted(&n->sub))
			rconn_drop(&n->sub, "no channel left");
		if (n->sub.state == RC_CONNECTING)
			watch_sub(&n->sub, now);
	}
	if (r->map_want || !r->map_ok || now - r->map_at_us > MAP_REFRESH_US ||
	    (down && now - r->map_at_us > MAP_DOWN_US))
		map_refresh(r);
}

static void watchdog_cb(lws_sorted_usec_list_t *sul)
{
	struct hub_redis *r = lws_container_of(sul, struct hub_redis, sul_watchdog);
	int64_t now = hub_mono_us();

	if (r->stopping)
		return;
	/* more than a period late: the loop was busy (silence_us) */
	if (r->watch_last_us && now - r->watch_last_us > 2 * WATCHDOG_US)
		r->loop_resumed_us = now;
	r->watch_last_us = now;
	watch_cmd(&r->cmd, now);
	for (int i = 0; r->cluster && i < r->nnodes; i++)
		if (r->nodes[i]->cmd.ac)
			watch_cmd(&r->nodes[i]->cmd, now);
	watch_sub(&r->sub, now);
	watch_sub(&r->ssub, now);
	if (r->cluster)
		watch_cluster(r, now);
	channels_sweep(r, now);
	lws_sul_schedule(r->hub->ctx, 0, &r->sul_watchdog, watchdog_cb, WATCHDOG_US);
}

/* ---- public -------------------------------------------------------------- */

struct hub_redis *hub_redis_new(struct hub *hub)
{
	struct hub_redis *r = hub_xcalloc(1, sizeof(*r));

	r->hub = hub;
	const char *split = getenv("IOT_HUB_TEST_PER_SLOT");
	r->split_test = split && !strcmp(split, "1");
	if (r->split_test)
		hub_warn("IOT_HUB_TEST_PER_SLOT=1: calls that would span hash slots go per slot "
			 "(a Redis Cluster's paths, on one Redis; tests only)");
	rconn_init(&r->cmd, r, "commands", ROLE_SEED, NULL);
	rconn_init(&r->sub, r, "pubsub", ROLE_SUB, NULL);
	rconn_init(&r->ssub, r, "sharded pubsub", ROLE_SSUB, NULL);
	return r;
}

void hub_redis_set_fatal(struct hub_redis *r, void (*fn)(void *), void *arg)
{
	r->fatal = fn;
	r->fatal_arg = arg;
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
	struct rconn *rc = r->cluster ? any_node_up(r) : &r->cmd;

	if (rc && rc->wsi)
		lws_callback_on_writable(rc->wsi);
}

bool hub_redis_up(const struct hub_redis *r)
{
	int64_t now;

	if (!r)
		return false;
	now = hub_mono_us();
	if (!r->cluster)
		return rconn_answering(&r->cmd, now);
	if (!r->map_ok)
		return false;
	for (int i = 0; i < r->nnodes; i++)
		if (r->nodes[i]->nslots && !rconn_answering(&r->nodes[i]->cmd, now))
			return false;
	return true;
}

bool hub_redis_cluster(const struct hub_redis *r)
{
	return r->cluster;
}

bool hub_redis_split(const struct hub_redis *r)
{
	return r->cluster || r->split_test;
}

bool hub_redis_slot_up(const struct hub_redis *r, int slot)
{
	const struct rnode *n;

	if (!r->cluster || slot < 0)
		return hub_redis_up(r);
	n = slot_owner(r, (unsigned)slot);
	return n && rconn_answering(&n->cmd, hub_mono_us());
}

size_t hub_redis_pending(const struct hub_redis *r)
{
	size_t n = r->cmd.ring_len;

	for (int i = 0; r->cluster && i < r->nnodes; i++)
		n += r->nodes[i]->cmd.ring_len;
	return n;
}

static int64_t rconn_backlog_us(const struct rconn *rc, int64_t now)
{
	int64_t age;

	if (!rc->ring_len)
		return 0;
	age = now - rc->ring[rc->ring_head].t0 - wait_allow_us(rc);
	return age > 0 ? age : 0;
}

int64_t hub_redis_backlog_us(const struct hub_redis *r, int slot, int64_t now_us)
{
	const struct rnode *n;
	int64_t worst = 0;

	if (!r->cluster)
		return rconn_backlog_us(&r->cmd, now_us);
	if (slot >= 0)
		return (n = slot_owner(r, (unsigned)slot)) ? rconn_backlog_us(&n->cmd, now_us) : 0;
	for (int i = 0; i < r->nnodes; i++) {
		int64_t b = rconn_backlog_us(&r->nodes[i]->cmd, now_us);
		worst = b > worst ? b : worst;
	}
	return worst;
}

int hub_redis_shards(const struct hub_redis *r)
{
	int n = 0;

	if (!r->cluster)
		return 1;
	for (int i = 0; i < r->nnodes; i++)
		n += r->nodes[i]->nslots > 0;
	return n;
}

int hub_redis_command_argv_slot(struct hub_redis *r, int slot, hub_redis_cb cb, void *arg,
				int argc, const char **argv, const size_t *argvlen)
{
	char *cmd;
	int len;

	if (!r->cluster)
		return r->cmd.state == RC_UP ? rconn_send(&r->cmd, cb, arg, argc, argv, argvlen) : -1;
	if (slot == HUB_REDIS_SLOT_AUTO) {
		const char *key;
		size_t klen;

		slot = hub_cmd_key(argc, argv, argvlen, &key, &klen) ?
		       (int)hub_slot(key, klen) : HUB_REDIS_SLOT_ANY;
	}
	len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
	if (len < 0)
		return -1;
	return cluster_send(r, slot, cb, arg, cmd, (size_t)len);
}

int hub_redis_command_argv(struct hub_redis *r, hub_redis_cb cb, void *arg,
			   int argc, const char **argv, const size_t *argvlen)
{
	return hub_redis_command_argv_slot(r, HUB_REDIS_SLOT_AUTO, cb, arg, argc, argv, argvlen);
}

int hub_redis_command_argv_shard(struct hub_redis *r, int shard, hub_redis_cb cb, void *arg,
				 int argc, const char **argv, const size_t *argvlen)
{
	char *cmd;
	int len;

	if (!r->cluster)
		return shard == 0 ? hub_redis_command_argv(r, cb, arg, argc, argv, argvlen) : -1;
	for (int i = 0; i < r->nnodes; i++) {
		struct rconn *rc = &r->nodes[i]->cmd;

		if (!r->nodes[i]->nslots || shard--)
			continue;
		if (rc->state != RC_UP || !rc->ac)
			return -1;
		len = redisFormatCommandArgv(&cmd, argc, argv, argvlen);
		if (len < 0)
			return -1;
		/* Not kept for a resend: a shard's command names no key. */
		if (redisAsyncFormattedCommand(rc->ac, on_reply, rc, cmd, (size_t)len) != REDIS_OK) {
			free(cmd);
			return -1;
		}
		free(cmd);
		ring_push(rc, cb, arg);
		return 0;
	}
	return -1;
}

int hub_redis_command_formatted_slot(struct hub_redis *r, int slot, hub_redis_cb cb, void *arg,
				     const char *cmd, size_t len)
{
	struct rconn *rc = &r->cmd;
	char *copy;

	if (!r->cluster) {
		if (rc->state != RC_UP || !rc->ac)
			return -1;
		if (redisAsyncFormattedCommand(rc->ac, on_reply, rc, cmd, len) != REDIS_OK)
			return -1;
		ring_push(rc, cb, arg);
		return 0;
	}
	if (slot == HUB_REDIS_SLOT_AUTO) {
		const char *key;
		size_t klen;

		slot = hub_resp_cmd_key(cmd, len, &key, &klen) ?
		       (int)hub_slot(key, klen) : HUB_REDIS_SLOT_ANY;
	}
	copy = hub_xmalloc(len);
	memcpy(copy, cmd, len);
	return cluster_send(r, slot, cb, arg, copy, len);
}

int hub_redis_command_formatted(struct hub_redis *r, hub_redis_cb cb, void *arg,
				const char *cmd, size_t len)
{
	return hub_redis_command_formatted_slot(r, HUB_REDIS_SLOT_AUTO, cb, arg, cmd, len);
}

/* ---- replication waits (ack-durability replicated) ------------------------
 * WAIT n ms answers how many replicas have every earlier write of this
 * connection. At most one is in flight per connection: Redis blocks the
 * connection until it answers, so a WAIT per batch would queue one full
 * wait per batch behind a slow replica; one WAIT instead covers every
 * durable command sent before it, and the next is sent when it answers (or
 * right after the command, pipelined, when none is in flight). In cluster
 * mode a command may be redirected to another primary, so its WAIT is sent
 * after its reply, on the connection that answered. */

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
	struct rconn *rc = d->r->reply_rc;

	d->replied = true;
	d->reply = reply ? reply_copy(reply) : NULL;
	if (d->cluster) {
		if (reply && reply->type != REDIS_REPLY_ERROR && rc) {
			durable_enqueue(rc, d);
			return;
		}
		d->wait_n = -1; /* an error reply as is, NULL as NULL */
	}
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

static void send_wait(struct rconn *rc);

static void on_wait_reply(redisReply *reply, void *arg)
{
	struct rconn *rc = arg;
	struct hub_redis *r = rc->r;
	struct durable *list = rc->wait_sent;
	int n = reply && reply->type == REDIS_REPLY_INTEGER && reply->integer < INT_MAX ?
		(int)reply->integer : -1;

	rc->wait_sent = NULL;
	rc->wait_inflight = false;
	if (reply) {
		r->hub->metrics.redis_waits_total++;
		if (n < r->hub->cfg.ack_replicas) {
			int64_t now = hub_mono_us();
			r->hub->metrics.redis_waits_short_total++;
			if (!r->wait_warned_us || now - r->wait_warned_us > WAIT_WARN_US) {
				r->wait_warned_us = now;
				hub_warn("redis: WAIT %d %d: %s%d replicas confirmed; what it covered "
					 "is answered unavailable (counted in "
					 "iot_hub_redis_waits_short_total; %s)",
					 r->hub->cfg.ack_replicas, r->hub->cfg.ack_wait_ms,
					 n < 0 ? "error, " : "", n < 0 ? 0 : n, rc->name);
			}
		}
	}
	settle_list(list, n);
	if (rc->wait_next)
		send_wait(rc);
}

static void send_wait(struct rconn *rc)
{
	struct hub_redis *r = rc->r;
	char n[16], ms[16];
	const char *argv[3] = { "WAIT", n, ms };
	struct durable *list = rc->wait_next;

	rc->wait_next = NULL;
	rc->wait_next_tail = &rc->wait_next;
	snprintf(n, sizeof(n), "%d", r->hub->cfg.ack_replicas);
	snprintf(ms, sizeof(ms), "%d", r->hub->cfg.ack_wait_ms);
	if (rconn_send(rc, on_wait_reply, rc, 3, argv, NULL)) {
		/* The connection is going: each settles (NULL) with its own reply. */
		settle_list(list, -1);
		return;
	}
	rc->wait_sent = list;
	rc->wait_inflight = true;
}

static void durable_enqueue(struct rconn *rc, struct durable *d)
{
	*rc->wait_next_tail = d;
	rc->wait_next_tail = &d->next;
	if (!rc->wait_inflight)
		send_wait(rc);
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
	d->cluster = r->cluster;
	if (hub_redis_command_formatted(r, on_durable_reply, d, cmd, len)) {
		free(d);
		return -1;
	}
	if (!d->cluster)
		durable_enqueue(&r->cmd, d);
	return 0;
}

static struct hub_redis_channel *channel_get(struct hub_redis *r, const char *name, bool pattern,
				      bool sharded, hub_redis_msg_cb cb,
				      hub_redis_state_cb state_cb, void *arg)
{
	struct hub_redis_channel *ch;
	size_t n = strlen(name);

	for (ch = r->channels; ch; ch = ch->next)
		if (ch->pattern == pattern && ch->sharded == sharded && !strcmp(ch->name, name))
			break;
	if (!ch) {
		ch = hub_xcalloc(1, sizeof(*ch) + n + 1);
		ch->r = r;
		ch->pattern = pattern;
		ch->sharded = sharded;
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

struct hub_redis_channel *hub_redis_channel_get(struct hub_redis *r, const char *name,
						bool pattern, hub_redis_msg_cb cb,
						hub_redis_state_cb state_cb, void *arg)
{
	return channel_get(r, name, pattern, false, cb, state_cb, arg);
}

struct hub_redis_channel *hub_redis_schannel_get(struct hub_redis *r, const char *name,
						 hub_redis_msg_cb cb,
						 hub_redis_state_cb state_cb, void *arg)
{
	return channel_get(r, name, false, true, cb, state_cb, arg);
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

int hub_redis_spublish(struct hub_redis *r, const char *channel, const char *payload,
		       size_t len, hub_redis_cb cb, void *arg)
{
	const char *argv[3] = { "SPUBLISH", channel, payload };
	size_t lens[3] = { 8, strlen(channel), len };

	return hub_redis_command_argv_slot(r, (int)hub_slot(channel, lens[1]), cb, arg, 3, argv,
					   lens);
}

static void rconn_stop(struct rconn *rc)
{
	lws_sul_cancel(&rc->sul_reconnect);
	lws_sul_cancel(&rc->sul_drop);
	rconn_drop(rc, "hub stopping");
}

void hub_redis_stop(struct hub_redis *r)
{
	if (!r || r->stopping)
		return;
	r->stopping = true;
	lws_sul_cancel(&r->sul_watchdog);
	rconn_stop(&r->cmd);
	rconn_stop(&r->sub);
	rconn_stop(&r->ssub);
	for (int i = 0; i < r->nnodes; i++) {
		rconn_stop(&r->nodes[i]->cmd);
		rconn_stop(&r->nodes[i]->sub);
	}
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
	for (int i = 0; i < r->nnodes; i++) {
		free(r->nodes[i]->cmd.ring);
		free(r->nodes[i]->sub.ring);
		free(r->nodes[i]);
	}
	free(r->slot_node);
	free(r->cmd.ring);
	free(r->sub.ring);
	free(r->ssub.ring);
	free(r);
}
