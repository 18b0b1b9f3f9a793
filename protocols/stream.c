#include "protocols/stream.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "hub/http.h"
#include "hub/hub.h"
#include "hub/ingest.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/loop.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/strmap.h"
#include "hub/util.h"
#include "protocols/agg.h"
#include "protocols/ws_rx.h"
#include "protocols/schema.h"


#define MAX_MESSAGE_BYTES (64 * 1024)  /* one dashboard message to the hub */
#define DISCARD_MAX_BYTES (16 * MAX_MESSAGE_BYTES) /* of a refused message, then cut off */
#define MAX_ID_LEN        64
#define LABEL_KEY_MAX     128          /* as announced by gateways (gw_codec) */
#define LABEL_VALUE_MAX   256
#define CTRL_MAX_BYTES    (256 * 1024) /* replies the client has not read (allocated) */
#define WRITES_PER_TURN   32           /* socket writes per WRITEABLE callback */
#define BATCH_BYTES       (16 * 1024)  /* data frames coalesced into one write */
#define BATCH_MSGS        128
#define CLOSE_UNAUTHORIZED 4401
#define CLOSE_FORBIDDEN    4403
#define CLOSE_AUTH_TIMEOUT 4408
#define CLOSE_SLOW         4008
#define CLOSE_GRACE_S      5            /* to write the close, then cut off */

/* ---- model ---------------------------------------------------------------
 *
 * A group is everything behind one Redis channel: raw readings of one device
 * type (SUBSCRIBE iot:live:raw:<type>), raw readings of any type (PSUBSCRIBE
 * iot:live:raw:*), presence, commands, aggregates. It holds one reference on
 * its channel while it has subscriptions. Groups live until shutdown (a
 * lingering channel may still deliver to an empty group).
 *
 * A message received from Redis is split into lines; a line's dashboard
 * message body (everything after `"sub":"<id>",`) is built once, on the
 * first subscription it matches, and shared by reference between queues.
 */

enum st_kind { K_RAW, K_1S, K_10S, K_1M, K_PRESENCE, K_COMMANDS, K_ANOM, K__COUNT };
/* `anomalies` (docs/anomalies.md) is raw readings narrowed to those that
 * carry anomaly flags: the same groups, positions, `since` and replay. */
#define RAWLIKE(k) ((k) == K_RAW || (k) == K_ANOM)
#define kind_names hub_stream_kinds
_Static_assert(K__COUNT == HUB_STREAM_KINDS, "hub_stream_kinds names every kind");

struct st_msg {
	unsigned refs;
	const char *type;          /* "reading", "aggregate", ... */
	uint64_t pos_ms, pos_seq;  /* raw: feed position (in feed shard `shard`) */
	unsigned shard;
	bool live;                 /* from pub/sub as it was stored (not a replay) */
	size_t len;
	char body[];               /* `"device":…}` */
};

struct st_conn;
struct st_group;

enum phase {
	PH_WAIT,      /* channel not active yet */
	PH_POSITION,  /* asking the feed for the current position */
	PH_REPLAY,    /* paging through the feed after `since` */
	PH_LIVE,
};

struct st_sub {
	struct st_sub *next;       /* in its connection */
	struct st_sub *gprev, *gnext; /* in its group */
	struct st_group *group;
	struct st_conn *conn;      /* NULL once the connection is gone */
	unsigned refs;             /* connection + queue entries + Redis ops */
	bool dead;
	enum st_kind kind;
	char id[MAX_ID_LEN + 1];
	size_t id_len;
	char *id_json;             /* the id as a JSON string, for every message */
	size_t id_json_len;
	/* filter */
	auth_patterns devices;
	bool has_devices;
	char *type;
	json_t *labels;
	char *group_by;
	size_t filter_entries;       /* devices + labels: its share of the budget */
	/* raw positions: one per feed shard (docs/dashboard.md) */
	bool has_since, resume, announced;
	bool retry;                  /* resume once Redis answers again */
	struct sh_pos {
		uint64_t last_ms, last_seq;  /* replay cursor, then last delivered */
		uint64_t seam_ms, seam_seq;  /* live frames at or before this were replayed */
		bool more, full;             /* a replay round (several shards) */
		uint64_t top_ms, top_seq;    /* the round's last id of this shard */
	} *sh;
	unsigned nsh;
	unsigned waiting;            /* replay / position replies still to come */
	struct rent *rents;          /* a replay round's entries (several shards) */
	size_t nrents, cap_rents;
	unsigned gen;                /* bumps when a Redis op becomes stale */
	struct st_msg **pend;        /* live messages held during position/replay */
	size_t npend, pend_cap, pend_bytes;
	bool pend_overflow;
	bool replay_wait;            /* next page once the queue drains */
	uint64_t dropped;            /* for the next `gap` */
	enum phase phase;
	uint64_t seq;                /* subscription order */
	uint64_t mark;               /* last line it was a candidate for */
};

/* Subscriptions of a group found by device: every line from Redis looks up
 * only the subscriptions that can match its device (exact ids, then each
 * prefix length in use), plus those with no device filter. Fan-out cost per
 * line then follows the matches, not the number of subscriptions. */
struct sub_vec {
	struct st_sub **v;
	size_t n, cap;
};

struct st_group {
	struct stream *st;
	struct st_sub *head, *tail;  /* in subscription order */
	unsigned nsubs;
	hub_strmap index;            /* "=<id>" / "*<prefix>" -> struct sub_vec * */
	struct sub_vec scan;         /* no device filter (or "*") */
	unsigned prefix_lens[HUB_ID_MAX + 1];
	int max_prefix_len;
	struct hub_redis_channel **chs; /* one, or on a cluster one per shard (x type) */
	unsigned nch;
	char *type;                  /* raw: the device type (NULL: any) */
	bool raw, agg, pattern;
	const char *msg_type;        /* presence/commands: message type */
	char channel[];
};

struct st_qent {
	struct st_msg *msg;
	struct st_sub *sub;
};

struct ctrl {
	struct ctrl *next;
	size_t len;
	char data[];                 /* LWS_PRE + message */
};

struct st_conn {
	struct st_conn *prev, *next;
	struct lws *wsi;
	struct hub *hub;
	struct stream *st;
	auth_principal who;
	bool authed, closing;
	int close_code;
	char close_reason[64];
	lws_sorted_usec_list_t sul_auth;
	struct st_sub *subs;
	unsigned nsubs;
	size_t filter_entries;       /* of all subs: at most stream-max-filter-entries */
	size_t npend, pend_bytes;    /* held by all subs' pend: the queue's limits */
	struct st_qent *q;
	size_t qhead, qlen, qcap, qbytes;
	struct ctrl *ctrl_head, *ctrl_tail;
	size_t ctrl_bytes;
	struct ws_rx rx;             /* message reassembly, capped */
	hub_buf w;
	bool kicked;                 /* in st->kick: written when the fan-out ends */
};

struct st_pss {
	struct st_conn *conn;
	struct hub_ka_entry ka;   /* liveness (hub/loop.h) */
};

/* The module: its groups, its connections, the fan-out scratch. */
struct stream {
	struct hub *hub;
	struct agg *agg;             /* aggregate windows are merged there */
	uint64_t sub_seq, line_seq;
	struct sub_vec cand;         /* fan-out scratch */
	hub_strmap raw_typed;        /* type -> struct st_group * */
	hub_strmap schans;           /* sharded raw channel -> struct st_schan * */
	struct st_group *raw_all, *presence, *commands, *agg_group;
	struct st_conn *conns;
	struct st_conn **kick;       /* connections a live message went to ... */
	size_t nkick, capkick;
	bool fanning;                /* ... while on_group_message fans it out */
	lws_sorted_usec_list_t sul_retry; /* raw subscriptions waiting for Redis */
	bool retry_armed;
	unsigned shards;             /* feed shards (0: not known yet) */
	bool sharded;                /* SSUBSCRIBE per shard (a cluster) */
	char feed[HUB_FEED_SHARDS_MAX][24];
};

/* A feed entry of a replay round over several shards. */
struct rent {
	uint64_t ms, seq;
	unsigned shard;
	char *readings;
	size_t len;
};

/* Learns the feed shard count (hub/ingest.h); false while it is unknown. */
static bool stream_shards(struct stream *st)
{
	unsigned n;

	if (st->shards)
		return true;
	if (!(n = hub_ingest_shards(st->hub)))
		return false;
	for (unsigned k = 0; k < n; k++)
		hub_key_feed(st->feed[k], sizeof(st->feed[k]), k);
	st->sharded = hub_ingest_sharded_pubsub(st->hub);
	st->shards = n;
	return true;
}

/* ---- messages ------------------------------------------------------------ */

static struct st_msg *msg_new(const char *type, const char *body, size_t len,
			      const char *tail, size_t tail_len)
{
	struct st_msg *m = hub_xmalloc(sizeof(*m) + len + tail_len + 1);

	m->refs = 1;
	m->type = type;
	m->pos_ms = m->pos_seq = 0;
	m->shard = 0;
	m->live = false;
	memcpy(m->body, body, len);
	if (tail_len) /* several shards: a raw body's tail is the subscriber's own */
		memcpy(m->body + len, tail, tail_len);
	m->len = len + tail_len;
	m->body[m->len] = '\0';
	return m;
}

static void msg_unref(struct st_msg *m)
{
	if (m && !--m->refs)
		free(m);
}

/* "<ms>-<n>" or "<ms>": a feed position (hub/util.h). */
static int parse_pos(const char *s, size_t len, uint64_t *ms, uint64_t *seq)
{
	return hub_parse_pos(s, len, false, ms, seq);
}

static bool pos_after(uint64_t ms, uint64_t seq, uint64_t ms0, uint64_t seq0)
{
	return ms > ms0 || (ms == ms0 && seq > seq0);
}

static void buf_pos(hub_buf *b, uint64_t ms, uint64_t seq)
{
	hub_buf_printf(b, "%" PRIu64 "-%" PRIu64, ms, seq);
}

/* A subscription's position: with one feed shard the id itself, with
 * several one id per shard, comma-separated, in shard order (opaque to
 * clients: docs/dashboard.md). */
static void buf_token(hub_buf *b, const struct st_sub *s)
{
	for (unsigned k = 0; k < s->nsh; k++) {
		if (k)
			hub_buf_puts(b, ",");
		buf_pos(b, s->sh[k].last_ms, s->sh[k].last_seq);
	}
}

/* since: a token of nsh ids, or one id (every shard from that id). */
static int parse_token(const char *p, size_t len, struct st_sub *s)
{
	unsigned k = 0;
	const char *end = p + len;

	for (;;) {
		const char *c = memchr(p, ',', (size_t)(end - p));
		const char *e = c ? c : end;
		if (k == s->nsh ||
		    parse_pos(p, (size_t)(e - p), &s->sh[k].last_ms, &s->sh[k].last_seq))
			return -1; /* more ids than shards, or not an id */
		k++;
		if (!c)
			break;
		p = c + 1;
	}
	if (k == 1)
		for (unsigned j = 1; j < s->nsh; j++)
			s->sh[j] = s->sh[0];
	else if (k != s->nsh)
		return -1;
	return 0;
}

/* ---- connection queue and writer ----------------------------------------- */

static void sub_unref(struct st_sub *s);

/* Closes with code once the replies queued before it are written. A peer
 * that does not read (the socket never becomes writeable) is cut off after
 * CLOSE_GRACE_S instead of holding the connection open. */
static void conn_close(struct st_conn *c, int code, const char *reason)
{
	if (!c->wsi || c->closing)
		return;
	c->closing = true;
	c->close_code = code;
	snprintf(c->close_reason, sizeof(c->close_reason), "%s", reason);
	lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, CLOSE_GRACE_S);
	lws_callback_on_writable(c->wsi);
}

/* Bytes a queued control message of len bytes holds: its allocation, so a
 * flood of tiny replies (a 15-byte pong) is counted for what it costs. */
#define CTRL_COST(len) (sizeof(struct ctrl) + LWS_PRE + (len))

/* Queues a control message (replies, errors): never dropped, written before
 * data. A client that stops reading its replies is closed. */
static void ctrl_push(struct st_conn *c, const char *data, size_t len)
{
	struct ctrl *m;

	if (!c->wsi || c->closing)
		return;
	if (c->ctrl_bytes + CTRL_COST(len) > CTRL_MAX_BYTES) {
		conn_close(c, LWS_CLOSE_STATUS_POLICY_VIOLATION, "replies not read");
		return;
	}
	m = hub_xmalloc(sizeof(*m) + LWS_PRE + len);
	m->next = NULL;
	m->len = len;
	memcpy(m->data + LWS_PRE, data, len);
	if (c->ctrl_tail)
		c->ctrl_tail->next = m;
	else
		c->ctrl_head = m;
	c->ctrl_tail = m;
	c->ctrl_bytes += CTRL_COST(len);
	lws_callback_on_writable(c->wsi);
}

static void ctrl_buf(struct st_conn *c, hub_buf *b)
{
	ctrl_push(c, b->data, b->len);
	hub_buf_free(b);
}

static void send_error(struct st_conn *c, const char *id, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void send_error(struct st_conn *c, const char *id, const char *code, const char *fmt, ...)
{
	hub_buf b = { 0 };
	char msg[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	hub_buf_puts(&b, "{\"type\":\"error\"");
	if (id) {
		hub_buf_puts(&b, ",\"id\":");
		hub_buf_json_str(&b, id, strlen(id));
	}
	hub_buf_puts(&b, ",\"code\":");
	hub_buf_json_str(&b, code, strlen(code));
	hub_buf_puts(&b, ",\"message\":");
	hub_buf_json_str(&b, msg, strlen(msg));
	hub_buf_puts(&b, "}");
	ctrl_buf(c, &b);
}

static void q_drop_head(struct st_conn *c)
{
	struct st_qent *e = &c->q[c->qhead];

	c->qbytes -= e->msg->len;
	if (!e->sub->dead)
		e->sub->dropped++;
	c->hub->metrics.stream_dropped[e->sub->kind]++;
	msg_unref(e->msg);
	sub_unref(e->sub);
	c->qhead = (c->qhead + 1) % c->qcap;
	c->qlen--;
}

static int conn_writeable(struct st_conn *c);

/* c's queue has something. During a live fan-out a connection with nothing
 * pending in lws is written when the fan-out ends (kick_flush), from the
 * pub/sub callback: no lws_callback_on_writable, so no epoll_ctl to arm
 * POLLOUT and another to disarm it per delivery. Otherwise, or if the
 * socket is full, the WRITEABLE callback writes it. */
static void conn_wake(struct st_conn *c)
{
	struct stream *st = c->st;

	if (!st->fanning || c->kicked || c->ctrl_head || lws_partial_buffered(c->wsi)) {
		lws_callback_on_writable(c->wsi);
		return;
	}
	if (st->nkick == st->capkick) {
		st->capkick = st->capkick ? 2 * st->capkick : 64;
		st->kick = hub_xrealloc(st->kick, st->capkick * sizeof(*st->kick));
	}
	c->kicked = true;
	st->kick[st->nkick++] = c;
}

/* The end of a live fan-out: the connections it queued to, written now
 * (conn_writeable asks for WRITEABLE itself when the socket takes less). */
static void kick_flush(struct stream *st)
{
	for (size_t i = 0; i < st->nkick; i++) {
		struct st_conn *c = st->kick[i];

		c->kicked = false;
		if (!c->wsi)
			continue;
		if (c->closing || c->ctrl_head) {
			lws_callback_on_writable(c->wsi);
			continue;
		}
		if (conn_writeable(c) < 0) /* not in its callback: lws closes it next turn */
			lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
	}
	st->nkick = 0;
	if (st->capkick > 4096) {
		free(st->kick);
		st->kick = NULL;
		st->capkick = 0;
	}
}

/* Queues msg for sub on its connection; the oldest go when it is full. */
static void enqueue(struct st_sub *s, struct st_msg *m)
{
	struct st_conn *c = s->conn;
	struct hub_config *cfg;

	if (!c || !c->wsi || c->closing)
		return;
	cfg = &c->hub->cfg;
	while (c->qlen && (c->qlen >= (size_t)cfg->stream_queue_max ||
			   c->qbytes + m->len > (size_t)cfg->stream_queue_max_bytes)) {
		if (cfg->stream_slow_policy[0] == 'c') {
			c->hub->metrics.stream_slow_closed_total++;
			conn_close(c, CLOSE_SLOW, "reading too slowly");
			return;
		}
		q_drop_head(c);
	}
	if (c->qlen == c->qcap) {
		size_t ncap = c->qcap ? c->qcap * 2 : 16;
		struct st_qent *n = hub_xmalloc(ncap * sizeof(*n));
		for (size_t i = 0; i < c->qlen; i++)
			n[i] = c->q[(c->qhead + i) % c->qcap];
		free(c->q);
		c->q = n;
		c->qcap = ncap;
		c->qhead = 0;
	}
	c->q[(c->qhead + c->qlen) % c->qcap] = (struct st_qent){ m, s };
	c->qlen++;
	c->qbytes += m->len;
	m->refs++;
	s->refs++;
	if (c->qlen == 1)
		conn_wake(c);
}

static void w_begin(hub_buf *w)
{
	w->len = 0;
	hub_buf_reserve(w, LWS_PRE + 256);
	memset(w->data, 0, LWS_PRE);
	w->len = LWS_PRE;
}

static void replay_next(struct st_sub *s);
static void replay_round(struct st_sub *s);

/* Server-to-client WebSocket text frame header (unmasked, FIN). */
static void frame_hdr(hub_buf *w, size_t len)
{
	uint8_t h[10];
	size_t n = 0;

	h[n++] = 0x81;
	if (len < 126) {
		h[n++] = (uint8_t)len;
	} else if (len <= 0xffff) {
		h[n++] = 126;
		h[n++] = (uint8_t)(len >> 8);
		h[n++] = (uint8_t)len;
	} else {
		h[n++] = 127;
		for (int i = 7; i >= 0; i--)
			h[n++] = (uint8_t)((uint64_t)len >> (8 * i));
	}
	hub_buf_append(w, h, n);
}

/* `{"type":"<type>","sub":<id>,<body>` as one frame appended to w. */
static void frame_msg(hub_buf *w, const struct st_sub *s, const struct st_msg *m)
{
	size_t tl = strlen(m->type);

	frame_hdr(w, 9 + tl + 8 + s->id_json_len + 1 + m->len);
	hub_buf_reserve(w, 24 + tl + s->id_json_len + m->len);
	hub_buf_append(w, "{\"type\":\"", 9);
	hub_buf_append(w, m->type, tl);
	hub_buf_append(w, "\",\"sub\":", 8);
	hub_buf_append(w, s->id_json, s->id_json_len);
	hub_buf_append(w, ",", 1);
	hub_buf_append(w, m->body, m->len);
}

static void frame_gap(hub_buf *w, struct st_sub *s)
{
	hub_buf g = { 0 };

	hub_buf_puts(&g, "{\"type\":\"gap\",\"sub\":");
	hub_buf_append(&g, s->id_json, s->id_json_len);
	hub_buf_puts(&g, ",\"dropped\":");
	hub_buf_i64(&g, (int64_t)s->dropped);
	hub_buf_puts(&g, "}");
	frame_hdr(w, g.len);
	hub_buf_append(w, g.data, g.len);
	hub_buf_free(&g);
	s->dropped = 0;
}

/* Sends what w holds after LWS_PRE as raw bytes: complete frames built
 * here, so one send() carries many messages (lws buffers a partial send and
 * reports the pipe choked until it is out). */
static int w_flush(struct st_conn *c, size_t msgs)
{
	size_t n = c->w.len - LWS_PRE;

	if (!n)
		return 0;
	if (lws_write(c->wsi, (unsigned char *)c->w.data + LWS_PRE, n, LWS_WRITE_RAW) < (int)n)
		return -1;
	c->hub->metrics.stream_messages_total += msgs;
	c->hub->metrics.bytes_sent[HUB_WS_DASHBOARD] += n;
	return 0;
}

/* Runs in the WRITEABLE callback: the socket had room. Writes until lws
 * holds a partial send (lws_partial_buffered: no syscall; lws_send_pipe_choked
 * polled the socket, a poll() per check, a fifth of the hub's CPU at 1,000
 * subscribers). */
static int conn_writeable(struct st_conn *c)
{
	int budget = WRITES_PER_TURN;
	int64_t now_ms = hub_now_ms();

	while (budget-- > 0 && !lws_partial_buffered(c->wsi)) {
		size_t msgs = 0;

		if (c->ctrl_head) {
			struct ctrl *m = c->ctrl_head;
			c->ctrl_head = m->next;
			if (!c->ctrl_head)
				c->ctrl_tail = NULL;
			c->ctrl_bytes -= CTRL_COST(m->len);
			int rc = lws_write(c->wsi, (unsigned char *)m->data + LWS_PRE, m->len,
					   LWS_WRITE_TEXT);
			free(m);
			if (rc < 0)
				return -1;
			c->hub->metrics.bytes_sent[HUB_WS_DASHBOARD] += (uint64_t)rc;
			continue;
		}
		if (c->closing || !c->qlen)
			break;
		w_begin(&c->w);
		while (c->qlen && msgs < BATCH_MSGS && c->w.len - LWS_PRE < BATCH_BYTES) {
			struct st_qent e = c->q[c->qhead];
			c->qhead = (c->qhead + 1) % c->qcap;
			c->qlen--;
			c->qbytes -= e.msg->len;
			if (!e.sub->dead) {
				if (e.sub->dropped) {
					frame_gap(&c->w, e.sub);
					msgs++;
				}
				frame_msg(&c->w, e.sub, e.msg);
				msgs++;
				if (e.msg->live) /* stored -> written, Redis's clock to ours */
					hub_hist_observe(&c->hub->metrics.stream_delivery,
							 now_ms > (int64_t)e.msg->pos_ms ?
							 (double)(now_ms - (int64_t)e.msg->pos_ms) / 1e3 : 0);
			}
			msg_unref(e.msg);
			sub_unref(e.sub);
		}
		if (w_flush(c, msgs))
			return -1;
	}
	if (c->closing && !c->ctrl_head) {
		lws_close_reason(c->wsi, (enum lws_close_status)c->close_code,
				 (unsigned char *)c->close_reason, strlen(c->close_reason));
		return -1;
	}
	if (!c->qlen && !c->ctrl_head && !lws_partial_buffered(c->wsi)) {
		/* Drained: tell subscriptions whose losses had no later message. */
		size_t msgs = 0;
		w_begin(&c->w);
		for (struct st_sub *s = c->subs; s; s = s->next)
			if (s->dropped) {
				frame_gap(&c->w, s);
				msgs++;
			}
		if (w_flush(c, msgs))
			return -1;
	}
	if (c->qlen < (size_t)c->hub->cfg.stream_queue_max / 2)
		for (struct st_sub *s = c->subs; s; s = s->next)
			if (s->replay_wait)
				replay_next(s);
	if (c->qlen || c->ctrl_head)
		lws_callback_on_writable(c->wsi);
	if (c->w.cap > 64 * 1024)
		hub_buf_free(&c->w);
	return 0;
}

/* ---- subscriptions: lifetime --------------------------------------------- */

static void pend_clear(struct st_sub *s)
{
	for (size_t i = 0; i < s->npend; i++)
		msg_unref(s->pend[i]);
	if (s->conn) {
		s->conn->npend -= s->npend;
		s->conn->pend_bytes -= s->pend_bytes;
	}
	s->npend = s->pend_bytes = 0;
	s->pend_overflow = false;
}

/* Before a replay round: the held live messages of the shards the round
 * reads again go (the round reads them from the feed); those of shards
 * read to their end already stay, for go_live after the seam (dropping
 * them too lost what was stored in such a shard after its last read). */
static void pend_drop_reread(struct st_sub *s)
{
	size_t kept = 0, bytes = 0;

	if (s->pend_overflow) {
		pend_clear(s);
		return;
	}
	for (size_t i = 0; i < s->npend; i++) {
		struct st_msg *m = s->pend[i];
		if (m->shard < s->nsh && !s->sh[m->shard].more) {
			s->pend[kept++] = m;
			bytes += m->len;
			continue;
		}
		msg_unref(m);
	}
	if (s->conn) {
		s->conn->npend -= s->npend - kept;
		s->conn->pend_bytes -= s->pend_bytes - bytes;
	}
	s->npend = kept;
	s->pend_bytes = bytes;
}

static void sub_unref(struct st_sub *s)
{
	if (--s->refs)
		return;
	pend_clear(s);
	free(s->pend);
	for (size_t i = 0; i < s->nrents; i++)
		free(s->rents[i].readings);
	free(s->rents);
	free(s->sh);
	for (size_t i = 0; i < s->devices.n; i++)
		free(s->devices.items[i]);
	free(s->devices.items);
	free(s->type);
	json_decref(s->labels);
	free(s->group_by);
	free(s->id_json);
	free(s);
}

static void group_acquire(struct st_group *g);
static void group_release(struct st_group *g);
static void index_remove(struct st_group *g, struct st_sub *s);

/* Removes s from its group and connection (unsubscribe or close). */
static void sub_kill(struct st_sub *s)
{
	struct stream *st = s->group->st;
	struct st_group *g = s->group;
	struct st_conn *c = s->conn;

	if (s->dead)
		return;
	s->dead = true;
	s->gen++;
	if (s->gprev)
		s->gprev->gnext = s->gnext;
	else
		g->head = s->gnext;
	if (s->gnext)
		s->gnext->gprev = s->gprev;
	else
		g->tail = s->gprev;
	g->nsubs--;
	index_remove(g, s);
	if (s->kind >= K_1S && s->kind <= K_1M)
		agg_want(st->agg, (enum agg_window)(s->kind - K_1S), false);
	group_release(g);
	if (c) {
		for (struct st_sub **pp = &c->subs; *pp; pp = &(*pp)->next)
			if (*pp == s) {
				*pp = s->next;
				break;
			}
		c->nsubs--;
		c->filter_entries -= s->filter_entries;
		st->hub->metrics.stream_subscriptions--;
	}
	pend_clear(s);
	s->conn = NULL;
	sub_unref(s);
}

/* ---- groups and channels ------------------------------------------------- */

static void sub_start(struct st_sub *s);
static void on_group_message(const char *channel, const char *payload, size_t len, void *arg);

static void on_group_state(struct hub_redis_channel *ch, bool active, void *arg)
{
	struct st_group *g = arg;
	struct st_sub *s, *next;

	(void)ch;
	if (g->agg)
		agg_set_active(g->st->agg, active);
	if (active)
		for (unsigned i = 0; i < g->nch; i++)
			if (!hub_redis_channel_active(g->chs[i]))
				return; /* the others follow: then start */
	for (s = g->head; s; s = next) {
		next = s->gnext;
		s->gen++; /* Redis ops in flight are stale either way */
		if (active) {
			if (s->phase == PH_WAIT)
				sub_start(s);
			continue;
		}
		/* Redis pub/sub lost: live messages are being missed. Raw
		 * subscriptions resume from their last position (replayed from
		 * the feed); the others are told. */
		pend_clear(s);
		s->replay_wait = false;
		if (RAWLIKE(s->kind)) {
			if (s->phase == PH_LIVE || s->phase == PH_REPLAY)
				s->resume = true;
		} else if (s->phase == PH_LIVE && s->conn) {
			hub_buf b = { 0 };
			hub_buf_puts(&b, "{\"type\":\"gap\",\"sub\":");
			hub_buf_json_str(&b, s->id, s->id_len);
			hub_buf_puts(&b, ",\"dropped\":0,\"reason\":\"redis\"}");
			ctrl_buf(s->conn, &b);
		}
		s->phase = PH_WAIT;
	}
}

static struct st_group *group_new(struct stream *st, const char *channel, bool pattern)
{
	size_t n = strlen(channel);
	struct st_group *g = hub_xcalloc(1, sizeof(*g) + n + 1);

	memcpy(g->channel, channel, n + 1);
	g->st = st;
	g->pattern = pattern;
	return g;
}

/* A sharded raw channel (one device type, one feed shard) is shared by
 * the type's group and the all-types group, and the bus keeps one callback
 * per channel name: the channel is taken once, for its first user, and its
 * messages and state go to every group of the stream that uses it. */
struct st_schan {
	struct stream *st;
	struct hub_redis_channel *ch;
	unsigned users;
	char type[];
};

static void on_schan_message(const char *channel, const char *payload, size_t len, void *arg)
{
	struct st_schan *sc = arg;
	struct stream *st = sc->st;
	struct st_group *g = hub_strmap_get(&st->raw_typed, sc->type, strlen(sc->type));

	if (g && g->nch)
		on_group_message(channel, payload, len, g);
	if (st->raw_all && st->raw_all->nch)
		on_group_message(channel, payload, len, st->raw_all);
}

static void on_schan_state(struct hub_redis_channel *ch, bool active, void *arg)
{
	struct st_schan *sc = arg;
	struct stream *st = sc->st;
	struct st_group *g = hub_strmap_get(&st->raw_typed, sc->type, strlen(sc->type));

	if (g && g->nch)
		on_group_state(ch, active, g);
	if (st->raw_all && st->raw_all->nch)
		on_group_state(ch, active, st->raw_all);
}

static void group_add_schannels(struct st_group *g, const char *type)
{
	struct stream *st = g->st;
	char ch[HUB_KEY_MAX];

	g->chs = hub_xrealloc(g->chs, (g->nch + st->shards) * sizeof(*g->chs));
	for (unsigned k = 0; k < st->shards; k++) {
		size_t n = hub_ch_raw_shard(ch, sizeof(ch), k, type);
		struct st_schan *sc = hub_strmap_get(&st->schans, ch, n);

		if (!sc) {
			sc = hub_xcalloc(1, sizeof(*sc) + strlen(type) + 1);
			sc->st = st;
			memcpy(sc->type, type, strlen(type) + 1);
			hub_strmap_put(&st->schans, ch, n, sc);
		}
		if (!sc->users++)
			sc->ch = hub_redis_schannel_get(st->hub->redis, ch, on_schan_message,
							on_schan_state, sc);
		g->chs[g->nch++] = sc->ch;
	}
}

/* Drops a group's use of a sharded raw channel; the last user puts it.
 * The entry stays for the process's life (one per loaded type and shard):
 * the bus may still call back with it while the channel lingers. */
static void schan_put(struct stream *st, struct hub_redis_channel *ch)
{
	const char *name = hub_redis_channel_name(ch);
	struct st_schan *sc = hub_strmap_get(&st->schans, name, strlen(name));

	if (!sc || !sc->users) {
		hub_redis_channel_put(ch);
		return;
	}
	if (--sc->users)
		return;
	sc->ch = NULL;
	hub_redis_channel_put(ch);
}

/* The group's channels: its one channel (or pattern); on a cluster, raw
 * readings come on sharded channels, one per feed shard per device type
 * (no patterns: readings of any type mean every loaded type's). */
static void group_acquire(struct st_group *g)
{
	struct stream *st = g->st;

	if (g->nch)
		return;
	if (!g->raw || !st->sharded) {
		g->chs = hub_xmalloc(sizeof(*g->chs));
		g->chs[0] = hub_redis_channel_get(st->hub->redis, g->channel, g->pattern,
						  on_group_message, on_group_state, g);
		g->nch = 1;
		return;
	}
	if (g->type) {
		group_add_schannels(g, g->type);
		return;
	}
	for (size_t i = 0; i < schema_set_count(st->hub->schemas); i++)
		group_add_schannels(g, schema_type_name(schema_set_at(st->hub->schemas, i)));
}

static bool group_active(const struct st_group *g)
{
	for (unsigned i = 0; i < g->nch; i++)
		if (!hub_redis_channel_active(g->chs[i]))
			return false;
	return g->nch > 0;
}

static void group_release(struct st_group *g)
{
	if (!g->nsubs && g->nch) {
		for (unsigned i = 0; i < g->nch; i++) {
			if (g->raw && g->st->sharded)
				schan_put(g->st, g->chs[i]);
			else
				hub_redis_channel_put(g->chs[i]);
		}
		free(g->chs);
		g->chs = NULL;
		g->nch = 0;
	}
}

static struct st_group *group_for(struct stream *st, enum st_kind kind, const char *type)
{
	if (RAWLIKE(kind) && !type)
		return st->raw_all;
	if (RAWLIKE(kind)) {
		struct st_group *g = hub_strmap_get(&st->raw_typed, type, strlen(type));
		if (!g) {
			/* A group (kept for the process's life) and a channel per
			 * loaded device type only: any name a client makes up
			 * would grow the hub for good. Such a subscription listens
			 * on the pattern; its filter still picks the type. */
			if (!schema_set_find(st->hub->schemas, type, strlen(type)))
				return st->raw_all;
			char ch[HUB_KEY_MAX];
			hub_ch_raw(ch, sizeof(ch), type);   /* subscribe checked the type */
			g = group_new(st, ch, false);
			g->raw = true;
			g->type = hub_xstrdup(type);
			hub_strmap_put(&st->raw_typed, type, strlen(type), g);
		}
		return g;
	}
	if (kind == K_PRESENCE)
		return st->presence;
	if (kind == K_COMMANDS)
		return st->commands;
	return st->agg_group;
}

/* ---- the device index ---------------------------------------------------- */

static void vec_push(struct sub_vec *v, struct st_sub *s)
{
	if (v->n == v->cap) {
		v->cap = v->cap ? v->cap * 2 : 8;
		v->v = hub_xrealloc(v->v, v->cap * sizeof(*v->v));
	}
	v->v[v->n++] = s;
}

static void vec_remove(struct sub_vec *v, struct st_sub *s)
{
	for (size_t i = 0; i < v->n; i++)
		if (v->v[i] == s) {
			memmove(&v->v[i], &v->v[i + 1], (v->n - i - 1) * sizeof(*v->v));
			v->n--;
			return;
		}
}

static size_t index_key(char *key, const char *pat, size_t len)
{
	bool prefix = len && pat[len - 1] == '*';

	key[0] = prefix ? '*' : '=';
	if (prefix)
		len--;
	memcpy(key + 1, pat, len);
	return len + 1;
}

static void index_add(struct st_group *g, struct st_sub *s)
{
	if (!s->has_devices || s->devices.all) {
		vec_push(&g->scan, s);
		return;
	}
	for (size_t i = 0; i < s->devices.n; i++) {
		char key[HUB_ID_MAX + 2];
		size_t kl = index_key(key, s->devices.items[i], strlen(s->devices.items[i]));
		struct sub_vec *v = hub_strmap_get(&g->index, key, kl);

		if (!v) {
			v = hub_xcalloc(1, sizeof(*v));
			hub_strmap_put(&g->index, key, kl, v);
		}
		if (v->n && v->v[v->n - 1] == s)
			continue; /* the same pattern twice */
		vec_push(v, s);
		if (key[0] == '*') {
			g->prefix_lens[kl - 1]++;
			if ((int)kl - 1 > g->max_prefix_len)
				g->max_prefix_len = (int)kl - 1;
		}
	}
}

static void index_remove(struct st_group *g, struct st_sub *s)
{
	if (!s->has_devices || s->devices.all) {
		vec_remove(&g->scan, s);
		return;
	}
	for (size_t i = 0; i < s->devices.n; i++) {
		char key[HUB_ID_MAX + 2];
		size_t kl = index_key(key, s->devices.items[i], strlen(s->devices.items[i]));
		struct sub_vec *v = hub_strmap_get(&g->index, key, kl);
		size_t before;

		if (!v)
			continue;
		before = v->n;
		vec_remove(v, s);
		if (v->n < before && key[0] == '*')
			g->prefix_lens[kl - 1]--;
		if (!v->n) {
			hub_strmap_del(&g->index, key, kl);
			free(v->v);
			free(v);
		}
	}
}

static void cand_add(struct stream *st, const struct sub_vec *v, uint64_t line)
{
	for (size_t i = 0; i < v->n; i++) {
		struct st_sub *s = v->v[i];
		if (s->mark == line)
			continue; /* found through another of its patterns */
		s->mark = line;
		vec_push(&st->cand, s);
	}
}

static int cmp_sub_seq(const void *a, const void *b)
{
	const struct st_sub *x = *(struct st_sub *const *)a, *y = *(struct st_sub *const *)b;

	return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* The subscriptions of g that may match device, in subscription order. */
static void candidates(struct st_group *g, const char *dev, size_t len)
{
	struct stream *st = g->st;
	uint64_t line = ++st->line_seq;
	char key[HUB_ID_MAX + 2];
	struct sub_vec *v;
	int sources = 0;

	st->cand.n = 0;
	if (g->scan.n) {
		cand_add(st, &g->scan, line);
		sources++;
	}
	if (len > HUB_ID_MAX || !g->index.count)
		return;
	key[0] = '=';
	memcpy(key + 1, dev, len);
	if ((v = hub_strmap_get(&g->index, key, len + 1))) {
		cand_add(st, v, line);
		sources++;
	}
	key[0] = '*';
	for (size_t l = 0; l <= len && (int)l <= g->max_prefix_len; l++) {
		if (!g->prefix_lens[l] || !(v = hub_strmap_get(&g->index, key, l + 1)))
			continue;
		cand_add(st, v, line);
		sources++;
	}
	if (sources > 1 && st->cand.n > 1)
		qsort(st->cand.v, st->cand.n, sizeof(*st->cand.v), cmp_sub_seq);
}

/* ---- filters ------------------------------------------------------------- */

/* What a line from Redis says about its device. labels is parsed lazily. */
struct meta {
	const char *device, *type, *labels_text;
	size_t device_len, type_len, labels_len;
	json_t *labels;
	bool labels_parsed;
};

static json_t *meta_labels(struct meta *m)
{
	if (!m->labels_parsed) {
		m->labels_parsed = true;
		m->labels = m->labels_text ? json_loadb(m->labels_text, m->labels_len, 0, NULL) : NULL;
	}
	return m->labels;
}

static bool labels_match(const json_t *want, const json_t *have)
{
	const char *k;
	json_t *v;

	json_object_foreach((json_t *)want, k, v) {
		json_t *h = json_object_get(have, k);
		if (!json_is_string(h) || strcmp(json_string_value(h), json_string_value(v)))
			return false;
	}
	return true;
}

static bool sub_matches(struct st_sub *s, struct meta *m)
{
	char dev[HUB_ID_MAX + 1];

	if (m->device_len > HUB_ID_MAX)
		return false;
	memcpy(dev, m->device, m->device_len);
	dev[m->device_len] = '\0';
	if (!s->conn->who.devices.all && !auth_patterns_match(&s->conn->who.devices, dev))
		return false;
	if (s->has_devices && !auth_patterns_match(&s->devices, dev))
		return false;
	if (s->type && (strlen(s->type) != m->type_len || memcmp(s->type, m->type, m->type_len)))
		return false;
	if (s->labels && !labels_match(s->labels, meta_labels(m)))
		return false;
	return true;
}

/* ---- delivery ------------------------------------------------------------ */

/* Several feed shards: a reading's `pos` is the subscription's whole
 * position after it (one id per shard), so the message is the shared body
 * (without its closing brace) plus this subscription's own tail. */
static void enqueue_token(struct st_sub *s, struct st_msg *m)
{
	hub_buf b = { 0 };
	struct st_msg *own;

	hub_buf_puts(&b, ",\"pos\":\"");
	buf_token(&b, s);
	hub_buf_puts(&b, "\"}");
	own = msg_new(m->type, m->body, m->len, b.data, b.len);
	own->pos_ms = m->pos_ms;
	own->pos_seq = m->pos_seq;
	own->shard = m->shard;
	own->live = m->live;
	enqueue(s, own);
	msg_unref(own);
	hub_buf_free(&b);
}

static void deliver(struct st_sub *s, struct st_msg *m, bool has_pos)
{
	struct stream *st = s->group->st;
	switch (s->phase) {
	case PH_WAIT:
		return;
	case PH_POSITION:
	case PH_REPLAY: {
		/* Held for the seam, within the connection's queue limits
		 * (all its subscriptions together): a replay the client does
		 * not read must not pile up live traffic. */
		struct st_conn *c = s->conn;
		const struct hub_config *cfg = &st->hub->cfg;
		if (c->npend >= (size_t)cfg->stream_queue_max ||
		    c->pend_bytes + m->len > (size_t)cfg->stream_queue_max_bytes) {
			s->pend_overflow = true; /* the feed has them: replay more */
			return;
		}
		if (s->npend == s->pend_cap) {
			s->pend_cap = s->pend_cap ? s->pend_cap * 2 : 16;
			s->pend = hub_xrealloc(s->pend, s->pend_cap * sizeof(*s->pend));
		}
		s->pend[s->npend++] = m;
		s->pend_bytes += m->len;
		c->npend++;
		c->pend_bytes += m->len;
		m->refs++;
		return;
	}
	case PH_LIVE:
		if (has_pos) {
			/* Readings of one frame share a position: compare with the
			 * seam, not with the last reading delivered. */
			struct sh_pos *h = &s->sh[m->shard < s->nsh ? m->shard : 0];
			if (!pos_after(m->pos_ms, m->pos_seq, h->seam_ms, h->seam_seq))
				return; /* at or before the seam: already sent */
			h->last_ms = m->pos_ms;
			h->last_seq = m->pos_seq;
			if (s->nsh > 1) {
				enqueue_token(s, m);
				return;
			}
		}
		enqueue(s, m);
		return;
	}
}

/* Splits one line `device\ttype\tlabels\tbody`; returns the body or NULL. */
static const char *split_line(const char *p, const char *end, struct meta *m, size_t *body_len)
{
	const char *t1 = memchr(p, '\t', (size_t)(end - p)), *t2, *t3;

	if (!t1 || !(t2 = memchr(t1 + 1, '\t', (size_t)(end - t1 - 1))) ||
	    !(t3 = memchr(t2 + 1, '\t', (size_t)(end - t2 - 1))))
		return NULL;
	memset(m, 0, sizeof(*m));
	m->device = p;
	m->device_len = (size_t)(t1 - p);
	m->type = t1 + 1;
	m->type_len = (size_t)(t2 - t1 - 1);
	m->labels_text = t2 + 1;
	m->labels_len = (size_t)(t3 - t2 - 1);
	*body_len = (size_t)(end - t3 - 1);
	return t3 + 1;
}

/* Calls fn for every line of a payload `header\nline\nline\n...`. */
typedef void (*line_fn)(struct meta *m, const char *body, size_t body_len, void *arg);

static void for_lines(const char *p, const char *end, line_fn fn, void *arg)
{
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		const char *le = nl ? nl : end;
		struct meta m;
		size_t bl;
		const char *body;

		memset(&m, 0, sizeof(m));
		body = split_line(p, le, &m, &bl);

		if (body)
			fn(&m, body, bl, arg);
		json_decref(m.labels);
		p = le + 1;
	}
}

struct fanout {
	struct st_group *g;
	const char *msg_type;
	bool has_pos;
	uint64_t pos_ms, pos_seq;
	unsigned shard;
	const char *tail;
	size_t tail_len;
};

/* A raw line's body ends with `,"anomalies":[…]` when the reading was
 * flagged, else with its data object's `}`. */
static bool body_flagged(const char *body, size_t bl)
{
	return bl && body[bl - 1] == ']';
}

static void fanout_line(struct meta *m, const char *body, size_t bl, void *arg)
{
	struct fanout *f = arg;
	struct stream *st = f->g->st;
	struct st_msg *msgs[2] = { NULL, NULL };  /* reading, anomaly */
	bool flagged = f->g->raw && body_flagged(body, bl);

	candidates(f->g, m->device, m->device_len);
	for (size_t i = 0; i < st->cand.n; i++) {
		struct st_sub *s = st->cand.v[i];
		unsigned w = s->kind == K_ANOM;
		if (s->phase == PH_WAIT || (w && !flagged) || !sub_matches(s, m))
			continue;
		if (!msgs[w]) {
			struct st_msg *msg = msg_new(w ? "anomaly" : f->msg_type, body, bl, f->tail,
						     f->tail_len);
			msg->pos_ms = f->pos_ms;
			msg->pos_seq = f->pos_seq;
			msg->shard = f->shard;
			msg->live = f->has_pos && f->pos_ms;
			msgs[w] = msg;
		}
		deliver(s, msgs[w], f->has_pos);
	}
	msg_unref(msgs[0]);
	msg_unref(msgs[1]);
}

static void on_group_message(const char *channel, const char *payload, size_t len, void *arg)
{
	struct st_group *g = arg;
	const char *nl, *end = payload + len;
	struct fanout f = { .g = g };
	hub_buf tail = { 0 };

	(void)channel;
	if (g->agg) {
		agg_on_partials(g->st->agg, payload, len);
		return;
	}
	if (!g->head)
		return;
	nl = memchr(payload, '\n', len);
	if (!nl)
		return;
	if (g->raw && g->st->shards > 1) {
		/* "<shard>/<id>": the subscription adds its own pos */
		const char *sl = memchr(payload, '/', (size_t)(nl - payload));
		uint64_t k, unused;
		if (!sl || parse_pos(payload, (size_t)(sl - payload), &k, &unused) ||
		    k >= g->st->shards ||
		    parse_pos(sl + 1, (size_t)(nl - sl - 1), &f.pos_ms, &f.pos_seq))
			return;
		f.shard = (unsigned)k;
		f.has_pos = f.pos_ms || f.pos_seq;
		f.msg_type = "reading";
		if (!f.has_pos)
			hub_buf_puts(&tail, ",\"pos\":\"0-0\"}");
	} else if (g->raw) {
		if (parse_pos(payload, (size_t)(nl - payload), &f.pos_ms, &f.pos_seq))
			return;
		f.has_pos = f.pos_ms || f.pos_seq; /* "0-0": no feed, no positions */
		f.msg_type = "reading";
		hub_buf_puts(&tail, ",\"pos\":\"");
		hub_buf_append(&tail, payload, (size_t)(nl - payload));
		hub_buf_puts(&tail, "\"}");
	} else {
		f.msg_type = g->msg_type;
		hub_buf_puts(&tail, "}");
	}
	f.tail = tail.data;
	f.tail_len = tail.len;
	g->st->fanning = true;
	for_lines(nl + 1, end, fanout_line, &f);
	g->st->fanning = false;
	kick_flush(g->st);
	hub_buf_free(&tail);
}

/* ---- raw: position and replay -------------------------------------------- */

struct op {
	struct st_sub *sub;
	unsigned gen;
};

static struct op *op_new(struct st_sub *s)
{
	struct op *o = hub_xmalloc(sizeof(*o));

	o->sub = s;
	o->gen = s->gen;
	s->refs++;
	return o;
}

/* The sub the op was for, or NULL when it went stale. Frees the op. */
static struct st_sub *op_take(struct op *o, bool *stale)
{
	struct st_sub *s = o->sub;

	*stale = s->dead || o->gen != s->gen || !s->conn;
	free(o);
	return s;
}

static void sub_fail(struct st_sub *s, const char *why)
{
	struct st_conn *c = s->conn;

	if (c) {
		send_error(c, s->id, "unavailable", "%s; subscribe again later", why);
		sub_kill(s);
	}
}

/* Raw subscriptions whose feed read failed for want of Redis (on a
 * cluster: the shard's primary is failing over) resume from their position
 * when it answers again, every RETRY_US: nothing is lost and the client
 * is told nothing (it may see a pause). */
#define RETRY_US (200 * 1000)

static bool group_active(const struct st_group *g);
static void sub_start(struct st_sub *s);

static void retry_cb(lws_sorted_usec_list_t *sul)
{
	struct stream *st = lws_container_of(sul, struct stream, sul_retry);
	bool again = false;

	st->retry_armed = false;
	for (struct st_conn *c = st->conns; c; c = c->next)
		for (struct st_sub *s = c->subs, *next; s; s = next) {
			next = s->next;
			if (!s->retry || s->dead || !s->conn)
				continue;
			if (!hub_redis_up(st->hub->redis) || !group_active(s->group)) {
				again = true;
				continue;
			}
			s->retry = false;
			if (s->phase == PH_WAIT)
				sub_start(s);
		}
	if (again && !st->retry_armed) {
		st->retry_armed = true;
		lws_sul_schedule(st->hub->ctx, 0, &st->sul_retry, retry_cb, RETRY_US);
	}
}

static void rents_clear(struct st_sub *s);

/* A feed read failed for want of Redis (NULL reply, or refused): a raw
 * subscription that already answered `subscribed` resumes later from its
 * position; anything else fails as sub_fail. */
static void sub_lost(struct st_sub *s, const char *why)
{
	struct stream *st;

	if (!RAWLIKE(s->kind) || !s->announced || !s->conn || s->dead) {
		sub_fail(s, why);
		return;
	}
	st = s->group->st;
	s->gen++;
	pend_clear(s);
	rents_clear(s);
	s->replay_wait = false;
	s->phase = PH_WAIT;
	s->resume = true;
	s->retry = true;
	if (!st->retry_armed) {
		st->retry_armed = true;
		lws_sul_schedule(st->hub->ctx, 0, &st->sul_retry, retry_cb, RETRY_US);
	}
}

/* with_pos: the position is the shards' tops (sh[].top_*). */
static void send_subscribed(struct st_sub *s, bool with_pos)
{
	hub_buf b = { 0 };

	hub_buf_puts(&b, "{\"type\":\"subscribed\",\"id\":");
	hub_buf_json_str(&b, s->id, s->id_len);
	if (with_pos) {
		hub_buf_puts(&b, ",\"position\":\"");
		for (unsigned k = 0; k < s->nsh; k++) {
			if (k)
				hub_buf_puts(&b, ",");
			buf_pos(&b, s->sh[k].top_ms, s->sh[k].top_seq);
		}
		hub_buf_puts(&b, "\"");
	}
	hub_buf_puts(&b, "}");
	ctrl_buf(s->conn, &b);
	s->announced = true;
}

/* Hands over from replay (or position) to live: the held live messages
 * after the cursor go out, the rest were sent from the feed. */
static void go_live(struct st_sub *s)
{
	size_t n = s->npend;
	struct st_msg **v = s->pend;

	s->phase = PH_LIVE;
	for (unsigned k = 0; k < s->nsh; k++) {
		s->sh[k].seam_ms = s->sh[k].last_ms;
		s->sh[k].seam_seq = s->sh[k].last_seq;
	}
	s->conn->npend -= n;
	s->conn->pend_bytes -= s->pend_bytes;
	s->pend = NULL;
	s->npend = s->pend_cap = s->pend_bytes = 0;
	for (size_t i = 0; i < n; i++) {
		deliver(s, v[i], v[i]->pos_ms || v[i]->pos_seq);
		msg_unref(v[i]);
	}
	free(v);
}

struct replay_ctx {
	struct st_sub *sub;
	uint64_t ms, seq;
	unsigned shard;
	hub_buf tail;
};

static void replay_line(struct meta *m, const char *body, size_t bl, void *arg)
{
	struct replay_ctx *r = arg;
	struct st_msg *msg;

	if ((r->sub->kind == K_ANOM && !body_flagged(body, bl)) || !sub_matches(r->sub, m))
		return;
	msg = msg_new(r->sub->kind == K_ANOM ? "anomaly" : "reading", body, bl, r->tail.data,
		      r->tail.len);
	msg->pos_ms = r->ms;
	msg->pos_seq = r->seq;
	msg->shard = r->shard;
	enqueue(r->sub, msg);
	msg_unref(msg);
	r->sub->group->st->hub->metrics.stream_replayed_total++;
}

static void on_replay_page(redisReply *reply, void *arg)
{
	bool stale;
	struct st_sub *s = op_take(arg, &stale);
	size_t n;

	if (stale)
		goto out;
	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		(reply ? sub_fail : sub_lost)(s, "the telemetry feed is unavailable");
		goto out;
	}
	n = reply->elements;
	for (size_t i = 0; i < n && s->conn; i++) {
		redisReply *e = reply->element[i];
		struct replay_ctx r = { .sub = s };

		if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
		    e->element[0]->type != REDIS_REPLY_STRING ||
		    parse_pos(e->element[0]->str, e->element[0]->len, &r.ms, &r.seq))
			continue;
		s->sh[0].last_ms = r.ms;
		s->sh[0].last_seq = r.seq;
		redisReply *f = e->element[1];
		for (size_t j = 0; f->type == REDIS_REPLY_ARRAY && j + 1 < f->elements; j += 2) {
			if (f->element[j]->type != REDIS_REPLY_STRING ||
			    strcmp(f->element[j]->str, "readings") ||
			    f->element[j + 1]->type != REDIS_REPLY_STRING)
				continue;
			hub_buf_puts(&r.tail, ",\"pos\":\"");
			hub_buf_append(&r.tail, e->element[0]->str, e->element[0]->len);
			hub_buf_puts(&r.tail, "\"}");
			for_lines(f->element[j + 1]->str, f->element[j + 1]->str + f->element[j + 1]->len,
				  replay_line, &r);
		}
		hub_buf_free(&r.tail);
	}
	if (!s->conn || s->dead)
		goto out;
	if (n >= (size_t)s->group->st->hub->cfg.stream_replay_page || s->pend_overflow) {
		s->replay_wait = true;
		if (s->conn->qlen < (size_t)s->group->st->hub->cfg.stream_queue_max / 2)
			replay_next(s);
	} else {
		go_live(s);
	}
out:
	sub_unref(s);
}

/* Asks for the feed page after the cursor. Live messages held so far are
 * all in the feed at or before what this XRANGE will see: drop them. */
static void replay_next(struct st_sub *s)
{
	struct stream *st = s->group->st;
	char start[64];
	const char *argv[6];

	s->replay_wait = false;
	if (s->dead || !s->conn)
		return;
	if (s->nsh > 1) {
		replay_round(s); /* drops what it reads again (pend_drop_reread) */
		return;
	}
	pend_clear(s);
	snprintf(start, sizeof(start), "(%" PRIu64 "-%" PRIu64, s->sh[0].last_ms, s->sh[0].last_seq);
	char count[16];
	snprintf(count, sizeof(count), "%d", st->hub->cfg.stream_replay_page);
	argv[0] = "XRANGE";
	argv[1] = st->feed[0];
	argv[2] = start;
	argv[3] = "+";
	argv[4] = "COUNT";
	argv[5] = count;
	struct op *o = op_new(s);
	if (hub_redis_command_argv(st->hub->redis, on_replay_page, o, 6, argv, NULL)) {
		bool stale;
		op_take(o, &stale);
		sub_unref(s);
		sub_lost(s, "Redis is unavailable");
	}
}

/* Every shard's top is known (sh[].top_*): subscribed, then replay or live. */
static void position_known(struct st_sub *s)
{
	send_subscribed(s, true);
	for (unsigned k = 0; k < s->nsh; k++)
		s->sh[k].more = true;
	if (s->has_since) {
		s->phase = PH_REPLAY;
		replay_next(s); /* from the cursor: since */
		return;
	}
	for (unsigned k = 0; k < s->nsh; k++) {
		s->sh[k].last_ms = s->sh[k].top_ms;
		s->sh[k].last_seq = s->sh[k].top_seq;
	}
	if (s->pend_overflow) {
		/* Live messages after the position were not all held: read
		 * them from the feed, from the position on. */
		s->phase = PH_REPLAY;
		replay_next(s);
	} else {
		go_live(s);
	}
}

struct shard_op {
	struct st_sub *sub;
	unsigned gen, shard;
};

static struct shard_op *shard_op_new(struct st_sub *s, unsigned shard)
{
	struct shard_op *o = hub_xmalloc(sizeof(*o));

	o->sub = s;
	o->gen = s->gen;
	o->shard = shard;
	s->refs++;
	return o;
}

/* XREVRANGE <feed shard> + - COUNT 1: that shard's top. */
static void on_position(redisReply *reply, void *arg)
{
	struct shard_op *o = arg;
	struct st_sub *s = o->sub;
	bool stale = s->dead || o->gen != s->gen || !s->conn;
	struct sh_pos *h = &s->sh[o->shard];

	free(o);
	if (stale)
		goto out;
	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		s->gen++; /* the other shards' answers are moot */
		(reply ? sub_fail : sub_lost)(s, "the telemetry feed is unavailable");
		goto out;
	}
	h->top_ms = h->top_seq = 0;
	if (reply->elements && reply->element[0]->type == REDIS_REPLY_ARRAY &&
	    reply->element[0]->elements >= 1 &&
	    reply->element[0]->element[0]->type == REDIS_REPLY_STRING)
		parse_pos(reply->element[0]->element[0]->str, reply->element[0]->element[0]->len,
			  &h->top_ms, &h->top_seq);
	if (!--s->waiting)
		position_known(s);
out:
	sub_unref(s);
}

/* ---- replay over several feed shards ---------------------------------------
 * A round asks every shard that may have more for its next page after its
 * cursor; when all answered, the entries up to the smallest last id of a
 * full page go out in id order (a shard whose page was full may hold
 * earlier entries than another's beyond it), each shard's cursor moves to
 * what went out of it, and the next round follows as the queue drains. */

static int cmp_rent(const void *a, const void *b)
{
	const struct rent *x = a, *y = b;

	if (x->ms != y->ms)
		return x->ms < y->ms ? -1 : 1;
	if (x->seq != y->seq)
		return x->seq < y->seq ? -1 : 1;
	return x->shard < y->shard ? -1 : x->shard > y->shard;
}

static void rents_clear(struct st_sub *s)
{
	for (size_t i = 0; i < s->nrents; i++)
		free(s->rents[i].readings);
	s->nrents = 0;
}

static void replay_merge(struct st_sub *s)
{
	uint64_t bms = UINT64_MAX, bseq = UINT64_MAX;
	bool more = false;
	size_t i;

	for (unsigned k = 0; k < s->nsh; k++) {
		struct sh_pos *h = &s->sh[k];
		if (!h->more || !h->full)
			continue;
		if (h->top_ms < bms || (h->top_ms == bms && h->top_seq < bseq)) {
			bms = h->top_ms;
			bseq = h->top_seq;
		}
	}
	/* a shard has more when its page was full, or when entries of it
	 * beyond the bound are left for the next round; each resumes after
	 * the last entry of it that went out */
	for (unsigned k = 0; k < s->nsh; k++) {
		s->sh[k].more = s->sh[k].more && s->sh[k].full;
		more |= s->sh[k].more;
	}
	if (s->nrents)
		qsort(s->rents, s->nrents, sizeof(*s->rents), cmp_rent);
	for (i = 0; i < s->nrents && s->conn; i++) {
		struct rent *e = &s->rents[i];
		struct replay_ctx r = { .sub = s, .ms = e->ms, .seq = e->seq, .shard = e->shard };

		if (e->ms > bms || (e->ms == bms && e->seq > bseq))
			break;
		s->sh[e->shard].last_ms = e->ms;
		s->sh[e->shard].last_seq = e->seq;
		hub_buf_puts(&r.tail, ",\"pos\":\"");
		buf_token(&r.tail, s);
		hub_buf_puts(&r.tail, "\"}");
		for_lines(e->readings, e->readings + e->len, replay_line, &r);
		hub_buf_free(&r.tail);
	}
	for (; i < s->nrents; i++) {
		s->sh[s->rents[i].shard].more = true;
		more = true;
	}
	rents_clear(s);
	if (!s->conn || s->dead)
		return;
	if (more || s->pend_overflow) {
		if (!more)
			for (unsigned k = 0; k < s->nsh; k++)
				s->sh[k].more = true;
		s->replay_wait = true;
		if (s->conn->qlen < (size_t)s->group->st->hub->cfg.stream_queue_max / 2)
			replay_next(s);
	} else {
		go_live(s);
	}
}

static void on_replay_shard(redisReply *reply, void *arg)
{
	struct shard_op *o = arg;
	struct st_sub *s = o->sub;
	bool stale = s->dead || o->gen != s->gen || !s->conn;
	struct sh_pos *h = &s->sh[o->shard];
	unsigned shard = o->shard;

	free(o);
	if (stale)
		goto out;
	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		s->gen++;
		rents_clear(s);
		(reply ? sub_fail : sub_lost)(s, "the telemetry feed is unavailable");
		goto out;
	}
	for (size_t i = 0; i < reply->elements; i++) {
		redisReply *e = reply->element[i], *f;
		uint64_t ms, seq;

		if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 ||
		    e->element[0]->type != REDIS_REPLY_STRING ||
		    parse_pos(e->element[0]->str, e->element[0]->len, &ms, &seq))
			continue;
		h->top_ms = ms;
		h->top_seq = seq;
		f = e->element[1];
		for (size_t j = 0; f->type == REDIS_REPLY_ARRAY && j + 1 < f->elements; j += 2) {
			struct rent *t;
			if (f->element[j]->type != REDIS_REPLY_STRING ||
			    strcmp(f->element[j]->str, "readings") ||
			    f->element[j + 1]->type != REDIS_REPLY_STRING)
				continue;
			if (s->nrents == s->cap_rents) {
				s->cap_rents = s->cap_rents ? s->cap_rents * 2 : 64;
				s->rents = hub_xrealloc(s->rents, s->cap_rents * sizeof(*s->rents));
			}
			t = &s->rents[s->nrents++];
			t->ms = ms;
			t->seq = seq;
			t->shard = shard;
			t->len = f->element[j + 1]->len;
			t->readings = hub_xmalloc(t->len + 1);
			memcpy(t->readings, f->element[j + 1]->str, t->len + 1);
		}
	}
	h->full = reply->elements >= (size_t)s->group->st->hub->cfg.stream_replay_page;
	if (!--s->waiting)
		replay_merge(s);
out:
	sub_unref(s);
}

static void replay_round(struct st_sub *s)
{
	struct stream *st = s->group->st;
	char start[64], count[16];

	pend_drop_reread(s);
	rents_clear(s);
	s->gen++; /* a round's replies belong to it alone */
	snprintf(count, sizeof(count), "%d", st->hub->cfg.stream_replay_page);
	s->waiting = 0;
	for (unsigned k = 0; k < s->nsh; k++) {
		struct sh_pos *h = &s->sh[k];
		h->full = false;
		if (!h->more)
			continue;
		snprintf(start, sizeof(start), "(%" PRIu64 "-%" PRIu64, h->last_ms, h->last_seq);
		const char *argv[6] = { "XRANGE", st->feed[k], start, "+", "COUNT", count };
		struct shard_op *o = shard_op_new(s, k);
		s->waiting++;
		if (hub_redis_command_argv(st->hub->redis, on_replay_shard, o, 6, argv, NULL)) {
			s->waiting--;
			free(o);
			s->gen++;
			sub_unref(s);
			sub_lost(s, "Redis is unavailable");
			return;
		}
	}
	if (!s->waiting)
		go_live(s);
}

/* The group's channel is active: start delivering. */
static void sub_start(struct st_sub *s)
{
	struct stream *st = s->group->st;
	if (!s->conn)
		return;
	if (!RAWLIKE(s->kind)) {
		s->phase = PH_LIVE;
		if (!s->announced)
			send_subscribed(s, false);
		return;
	}
	if (s->resume) {
		/* Back after a pub/sub loss: replay from the last position. */
		s->resume = false;
		s->phase = PH_REPLAY;
		for (unsigned k = 0; k < s->nsh; k++)
			s->sh[k].more = true;
		replay_next(s);
		return;
	}
	s->phase = PH_POSITION;
	s->waiting = s->nsh;
	for (unsigned k = 0; k < s->nsh; k++) {
		const char *argv[6] = { "XREVRANGE", st->feed[k], "+", "-", "COUNT", "1" };
		struct shard_op *o = shard_op_new(s, k);
		if (hub_redis_command_argv(st->hub->redis, on_position, o, 6, argv, NULL)) {
			free(o);
			s->gen++;
			sub_unref(s);
			sub_lost(s, "Redis is unavailable");
			return;
		}
	}
}

/* ---- aggregates ---------------------------------------------------------- */

struct group_acc {
	char *value;               /* label value, NULL: no such label */
	struct agg_state st;
};

static void emit_grouped(struct st_sub *s, enum agg_window w, int64_t start,
			 struct agg_state **v, size_t n)
{
	struct group_acc *acc = NULL;
	size_t nacc = 0, cap = 0;

	for (size_t i = 0; i < n; i++) {
		struct meta m = {
			.device = v[i]->device, .device_len = strlen(v[i]->device),
			.type = v[i]->type, .type_len = strlen(v[i]->type),
			.labels = v[i]->labels, .labels_parsed = true,
		};
		json_t *lv;
		const char *val;
		size_t k;

		if (!sub_matches(s, &m))
			continue;
		lv = json_object_get(v[i]->labels, s->group_by);
		val = json_is_string(lv) ? json_string_value(lv) : NULL;
		for (k = 0; k < nacc; k++)
			if ((!val && !acc[k].value) || (val && acc[k].value && !strcmp(val, acc[k].value)))
				break;
		if (k == nacc) {
			if (nacc == cap) {
				cap = cap ? cap * 2 : 8;
				acc = hub_xrealloc(acc, cap * sizeof(*acc));
			}
			memset(&acc[k], 0, sizeof(acc[k]));
			acc[k].value = val ? hub_xstrdup(val) : NULL;
			nacc++;
		}
		agg_state_merge(&acc[k].st, v[i]);
	}
	for (size_t k = 0; k < nacc; k++) {
		hub_buf b = { 0 };
		struct st_msg *msg;

		hub_buf_puts(&b, "\"window\":\"");
		hub_buf_puts(&b, agg_window_names[w]);
		hub_buf_puts(&b, "\",\"start\":");
		hub_buf_i64(&b, start);
		hub_buf_puts(&b, ",\"group\":{");
		hub_buf_json_str(&b, s->group_by, strlen(s->group_by));
		hub_buf_puts(&b, ":");
		if (acc[k].value)
			hub_buf_json_str(&b, acc[k].value, strlen(acc[k].value));
		else
			hub_buf_puts(&b, "null");
		hub_buf_puts(&b, "},");
		agg_metrics_json(&acc[k].st, &b);
		msg = msg_new("aggregate", b.data, b.len, "}", 1);
		enqueue(s, msg);
		msg_unref(msg);
		hub_buf_free(&b);
		free(acc[k].value);
		agg_state_clear(&acc[k].st);
	}
	free(acc);
}

/* agg's emit callback: the merged window w starting at start. */
static void emit_aggregates(void *ctx, enum agg_window w, int64_t start,
			    struct agg_state **v, size_t n)
{
	struct stream *st = ctx;
	struct st_msg **per_dev = NULL;
	struct st_sub *s, *next;

	for (s = st->agg_group->head; s; s = next) {
		next = s->gnext;
		if ((int)s->kind != K_1S + (int)w || s->phase != PH_LIVE || !s->conn)
			continue;
		if (s->group_by) {
			emit_grouped(s, w, start, v, n);
			continue;
		}
		for (size_t i = 0; i < n; i++) {
			struct meta m = {
				.device = v[i]->device, .device_len = strlen(v[i]->device),
				.type = v[i]->type, .type_len = strlen(v[i]->type),
				.labels = v[i]->labels, .labels_parsed = true,
			};
			if (!sub_matches(s, &m))
				continue;
			if (!per_dev)
				per_dev = hub_xcalloc(n, sizeof(*per_dev));
			if (!per_dev[i]) {
				hub_buf b = { 0 };
				hub_buf_puts(&b, "\"window\":\"");
				hub_buf_puts(&b, agg_window_names[w]);
				hub_buf_puts(&b, "\",\"start\":");
				hub_buf_i64(&b, start);
				hub_buf_puts(&b, ",\"device\":\"");
				hub_buf_puts(&b, v[i]->device);
				hub_buf_puts(&b, "\",");
				agg_metrics_json(v[i], &b);
				per_dev[i] = msg_new("aggregate", b.data, b.len, "}", 1);
				hub_buf_free(&b);
			}
			enqueue(s, per_dev[i]);
		}
	}
	if (per_dev) {
		for (size_t i = 0; i < n; i++)
			msg_unref(per_dev[i]);
		free(per_dev);
	}
}

/* ---- client messages ----------------------------------------------------- */

static bool pattern_valid(const char *p, size_t len)
{
	if (len && p[len - 1] == '*')
		return len == 1 || hub_id_valid(p, len - 1);
	return hub_id_valid(p, len);
}

/* Why a subscribe is refused, or SUB_OK (0); the wire codes are
 * sub_refusal_codes. The message goes in the caller's buffer
 * (docs/hacking.md "Errors"). */
enum sub_refusal {
	SUB_OK,
	SUB_BAD_FILTER,
	SUB_FORBIDDEN,
	SUB_FILTER_TOO_LARGE,
	SUB_FILTER_BUDGET_EXCEEDED,
	SUB_BAD_SINCE,
	SUB__COUNT
};

static const char *const sub_refusal_codes[SUB__COUNT] = {
	[SUB_OK] = NULL,
	[SUB_BAD_FILTER] = "bad_filter",
	[SUB_FORBIDDEN] = "forbidden",
	[SUB_FILTER_TOO_LARGE] = "filter_too_large",
	[SUB_FILTER_BUDGET_EXCEEDED] = "filter_budget_exceeded",
	[SUB_BAD_SINCE] = "bad_since",
};

/* The filter into s: SUB_OK, or SUB_BAD_FILTER / SUB_FORBIDDEN (a device
 * the token may not read) with the reason in err. */
static enum sub_refusal parse_filter(struct st_conn *c, struct st_sub *s, json_t *f,
				     char *err, size_t errlen)
{
	json_t *v;

	if (!f || json_is_null(f))
		return SUB_OK;
	if (!json_is_object(f)) {
		snprintf(err, errlen, "filter must be an object");
		return SUB_BAD_FILTER;
	}
	v = json_object_get(f, "devices");
	if (v && !json_is_null(v)) {
		size_t n = json_array_size(v);
		if (!json_is_array(v)) {
			snprintf(err, errlen, "filter.devices must be an array of strings");
			return SUB_BAD_FILTER;
		}
		s->has_devices = true;
		s->devices.items = n ? hub_xcalloc(n, sizeof(char *)) : NULL;
		for (size_t i = 0; i < n; i++) {
			json_t *d = json_array_get(v, i);
			const char *p = json_string_value(d);
			size_t len = json_string_length(d);
			if (!json_is_string(d) || !pattern_valid(p, len)) {
				snprintf(err, errlen, "filter.devices[%zu] must be a device id or a prefix ending in '*'", i);
				return SUB_BAD_FILTER;
			}
			if (p[len - 1] != '*' && !c->who.devices.all &&
			    !auth_patterns_match(&c->who.devices, p)) {
				snprintf(err, errlen, "device %.128s is not allowed by this token", p);
				return SUB_FORBIDDEN;
			}
			s->devices.items[s->devices.n++] = hub_xstrdup(p);
			if (len == 1)
				s->devices.all = true;
		}
	}
	v = json_object_get(f, "device_type");
	if (v && !json_is_null(v)) {
		if (!json_is_string(v) || !hub_id_valid(json_string_value(v), json_string_length(v))) {
			snprintf(err, errlen, "filter.device_type must be a device type name");
			return SUB_BAD_FILTER;
		}
		s->type = hub_xstrdup(json_string_value(v));
	}
	v = json_object_get(f, "labels");
	if (v && !json_is_null(v)) {
		const char *k;
		json_t *lv;
		if (!json_is_object(v)) {
			snprintf(err, errlen, "filter.labels must be an object of strings");
			return SUB_BAD_FILTER;
		}
		json_object_foreach(v, k, lv) {
			if (!json_is_string(lv)) {
				snprintf(err, errlen, "filter.labels.%.64s must be a string", k);
				return SUB_BAD_FILTER;
			}
			if (strlen(k) > LABEL_KEY_MAX || json_string_length(lv) > LABEL_VALUE_MAX) {
				/* No device can have it (gateways announce no longer). */
				snprintf(err, errlen, "filter.labels.%.64s: a label name is at most %d "
					 "bytes, a value at most %d", k, LABEL_KEY_MAX, LABEL_VALUE_MAX);
				return SUB_BAD_FILTER;
			}
		}
		if (json_object_size(v))
			s->labels = json_incref(v);
	}
	return SUB_OK;
}

/* The caps on a filter's size, checked before anything is allocated for the
 * subscription: ids and prefixes per filter, labels per filter, and the
 * connection's budget of entries over all its subscriptions (so 64 maximal
 * subscriptions stay within a stated memory bound; docs/dashboard.md).
 * Malformed parts are left to parse_filter. Returns SUB_OK with the
 * filter's entries in *entries, or SUB_FILTER_TOO_LARGE /
 * SUB_FILTER_BUDGET_EXCEEDED with the reason in err. */
static enum sub_refusal filter_caps(struct st_conn *c, json_t *f, size_t *entries, char *err,
				    size_t errlen)
{
	const struct hub_config *cfg = &c->hub->cfg;
	json_t *d = json_object_get(f, "devices"), *l = json_object_get(f, "labels");
	size_t nd = json_is_array(d) ? json_array_size(d) : 0;
	size_t nl = json_is_object(l) ? json_object_size(l) : 0;

	*entries = nd + nl;
	if (nd > (size_t)cfg->stream_max_filter_devices) {
		snprintf(err, errlen, "filter.devices has %zu entries; at most %d "
			 "(stream-max-filter-devices): use prefixes ending in '*'",
			 nd, cfg->stream_max_filter_devices);
		return SUB_FILTER_TOO_LARGE;
	}
	if (nl > (size_t)cfg->stream_max_filter_labels) {
		snprintf(err, errlen, "filter.labels has %zu labels; at most %d "
			 "(stream-max-filter-labels)", nl, cfg->stream_max_filter_labels);
		return SUB_FILTER_TOO_LARGE;
	}
	if (c->filter_entries + *entries > (size_t)cfg->stream_max_filter_entries) {
		snprintf(err, errlen, "this connection's filters would hold %zu device "
			 "ids, prefixes and labels; at most %d (stream-max-filter-entries)",
			 c->filter_entries + *entries, cfg->stream_max_filter_entries);
		return SUB_FILTER_BUDGET_EXCEEDED;
	}
	return SUB_OK;
}

static struct st_sub *find_sub(struct st_conn *c, const char *id)
{
	for (struct st_sub *s = c->subs; s; s = s->next)
		if (!strcmp(s->id, id))
			return s;
	return NULL;
}

/* The subscribe message's id and stream, checked: the kind, or -1 with the
 * error sent. */
static int subscribe_kind(struct st_conn *c, json_t *msg, const char **idp)
{
	json_t *jid = json_object_get(msg, "id"), *jstream = json_object_get(msg, "stream");
	const char *id = json_string_value(jid);
	int kind;

	if (!json_is_string(jid) || !json_string_length(jid) ||
	    json_string_length(jid) > MAX_ID_LEN || strlen(id) != json_string_length(jid)) {
		send_error(c, NULL, "bad_message", "subscribe needs an id: a string of 1 to %d characters",
			   MAX_ID_LEN);
		return -1;
	}
	*idp = id;
	if (find_sub(c, id)) {
		send_error(c, id, "duplicate_id", "a subscription with this id exists on this connection");
		return -1;
	}
	if (!json_is_string(jstream)) {
		send_error(c, id, "bad_message", "subscribe needs a stream (a string)");
		return -1;
	}
	for (kind = 0; kind < K__COUNT; kind++)
		if (!strcmp(json_string_value(jstream), kind_names[kind]))
			return kind;
	send_error(c, id, "unknown_stream",
		   "stream must be one of raw, 1s, 10s, 1m, presence, commands, anomalies");
	return -1;
}

static struct st_sub *sub_new(struct st_conn *c, const char *id, enum st_kind kind)
{
	struct st_sub *s = hub_xcalloc(1, sizeof(*s));
	hub_buf j = { 0 };

	s->refs = 1;
	s->kind = kind;
	s->id_len = strlen(id);
	memcpy(s->id, id, s->id_len + 1);
	hub_buf_json_str(&j, s->id, s->id_len);
	s->id_json = hub_xmalloc(j.len + 1);
	memcpy(s->id_json, j.data, j.len);
	s->id_json[j.len] = '\0';
	s->id_json_len = j.len;
	hub_buf_free(&j);
	s->conn = c;
	return s;
}

/* group_by and since: SUB_OK, or SUB_BAD_FILTER (group_by) / SUB_BAD_SINCE
 * with the reason in err. */
static enum sub_refusal subscribe_options(struct st_sub *s, json_t *msg, char *err,
					  size_t errlen)
{
	json_t *jgb = json_object_get(msg, "group_by"), *jsince = json_object_get(msg, "since");

	if (jgb && !json_is_null(jgb)) {
		if (s->kind < K_1S || s->kind > K_1M) {
			snprintf(err, errlen, "group_by is only for the 1s, 10s and 1m streams");
			return SUB_BAD_FILTER;
		}
		if (!json_is_string(jgb) || !json_string_length(jgb) || json_string_length(jgb) > 128) {
			snprintf(err, errlen, "group_by must be a label name");
			return SUB_BAD_FILTER;
		}
		s->group_by = hub_xstrdup(json_string_value(jgb));
	}
	if (jsince && !json_is_null(jsince)) {
		if (!RAWLIKE(s->kind)) {
			snprintf(err, errlen, "since is only for the raw and anomalies streams");
			return SUB_BAD_SINCE;
		}
		if (!json_is_string(jsince) ||
		    parse_token(json_string_value(jsince), json_string_length(jsince), s)) {
			snprintf(err, errlen, "since must be a position as in pos");
			return SUB_BAD_SINCE;
		}
		s->has_since = true;
	}
	return SUB_OK;
}

/* Joins the subscription to its group (and the group's Redis channel) and
 * to its connection, then starts it if the channel is active. */
static void sub_join(struct st_conn *c, struct st_sub *s, size_t entries)
{
	struct stream *st = c->st;

	s->group = group_for(st, s->kind, s->type);
	/* Appended: a message matching several subscriptions of one
	 * connection goes out in subscription order. */
	s->gprev = s->group->tail;
	if (s->gprev)
		s->gprev->gnext = s;
	else
		s->group->head = s;
	s->group->tail = s;
	s->seq = ++st->sub_seq;
	index_add(s->group, s);
	s->group->nsubs++;
	s->next = c->subs;
	c->subs = s;
	c->nsubs++;
	s->filter_entries = entries;
	c->filter_entries += entries;
	c->hub->metrics.stream_subscriptions++;
	if (s->kind >= K_1S && s->kind <= K_1M)
		agg_want(st->agg, (enum agg_window)(s->kind - K_1S), true);
	group_acquire(s->group);
	s->phase = PH_WAIT;
	if (group_active(s->group))
		sub_start(s);
}

static void handle_subscribe(struct st_conn *c, json_t *msg)
{
	const char *id = NULL;
	char err[256];
	enum sub_refusal r;
	struct st_sub *s;
	size_t entries;
	int kind = subscribe_kind(c, msg, &id);

	if (kind < 0)
		return;
	if (!hub_redis_up(c->hub->redis) || !stream_shards(c->st)) {
		send_error(c, id, "unavailable", "Redis is unavailable; subscribe again later");
		return;
	}
	if (c->nsubs >= (unsigned)c->hub->cfg.stream_max_subscriptions) {
		send_error(c, id, "too_many_subscriptions", "at most %d subscriptions per connection",
			   c->hub->cfg.stream_max_subscriptions);
		return;
	}
	r = filter_caps(c, json_object_get(msg, "filter"), &entries, err, sizeof(err));
	if (r != SUB_OK) {
		send_error(c, id, sub_refusal_codes[r], "%s", err);
		return;
	}
	s = sub_new(c, id, (enum st_kind)kind);
	s->nsh = c->st->shards;
	s->sh = hub_xcalloc(s->nsh, sizeof(*s->sh));
	r = parse_filter(c, s, json_object_get(msg, "filter"), err, sizeof(err));
	if (r == SUB_OK)
		r = subscribe_options(s, msg, err, sizeof(err));
	if (r != SUB_OK) {
		send_error(c, id, sub_refusal_codes[r], "%s", err);
		s->conn = NULL;
		sub_unref(s);
		return;
	}
	sub_join(c, s, entries);
}

static void handle_unsubscribe(struct st_conn *c, json_t *msg)
{
	json_t *jid = json_object_get(msg, "id");
	struct st_sub *s;
	hub_buf b = { 0 };

	if (!json_is_string(jid)) {
		send_error(c, NULL, "bad_message", "unsubscribe needs an id (a string)");
		return;
	}
	s = find_sub(c, json_string_value(jid));
	if (!s) {
		send_error(c, json_string_value(jid), "unknown_id", "no subscription with this id");
		return;
	}
	hub_buf_puts(&b, "{\"type\":\"unsubscribed\",\"id\":");
	hub_buf_json_str(&b, s->id, s->id_len);
	hub_buf_puts(&b, "}");
	sub_kill(s);
	ctrl_buf(c, &b);
}

enum stream_auth {
	STREAM_AUTH_OK,
	STREAM_AUTH_UNAUTHORIZED,   /* unknown key, bad token */
	STREAM_AUTH_FORBIDDEN,      /* valid, but without telemetry:read */
};

/* Checks a dashboard token (API key, or JWT with scope telemetry:read). On
 * STREAM_AUTH_OK fills *out (caller clears it); otherwise writes the reason,
 * the message told to the client, to err (docs/hacking.md "Errors"). */
static enum stream_auth stream_authenticate(struct hub *hub, const char *token, size_t len,
					    auth_principal *out, char *err, size_t errlen)
{
	enum auth_result rc = auth_check_api_key(hub->auth, token, len, out);

	if (rc == AUTH_UNKNOWN_KEY && memchr(token, '.', len)) {
		rc = auth_verify_jwt(hub->auth, token, len, hub_now_ms() / 1000, out);
		if (rc == AUTH_OK && !out->has_devices_claim)
			out->devices.all = true; /* optional for dashboards (docs/dashboard.md) */
	}
	if (rc != AUTH_OK) {
		snprintf(err, errlen, "%s", auth_strerror(rc));
		return STREAM_AUTH_UNAUTHORIZED;
	}
	if (!auth_has_scope(out, AUTH_SCOPE_TELEMETRY_READ)) {
		auth_principal_clear(out);
		snprintf(err, errlen, "the token lacks the telemetry:read scope");
		return STREAM_AUTH_FORBIDDEN;
	}
	return STREAM_AUTH_OK;
}

static void handle_auth(struct st_conn *c, json_t *msg)
{
	json_t *tok = json_object_get(msg, "token");
	char why[128];
	enum stream_auth rc;
	hub_buf b = { 0 };

	if (c->authed) {
		send_error(c, NULL, "bad_message", "already authenticated");
		return;
	}
	if (!json_is_string(tok)) {
		send_error(c, NULL, "unauthorized", "auth needs a token (a string)");
		conn_close(c, CLOSE_UNAUTHORIZED, "unauthorized");
		c->hub->metrics.stream_auth_failures_total++;
		return;
	}
	rc = stream_authenticate(c->hub, json_string_value(tok), json_string_length(tok),
				 &c->who, why, sizeof(why));
	if (rc != STREAM_AUTH_OK) {
		bool forbidden = rc == STREAM_AUTH_FORBIDDEN;
		send_error(c, NULL, forbidden ? "forbidden" : "unauthorized", "%s", why);
		conn_close(c, forbidden ? CLOSE_FORBIDDEN : CLOSE_UNAUTHORIZED,
			   forbidden ? "forbidden" : "unauthorized");
		c->hub->metrics.stream_auth_failures_total++;
		return;
	}
	c->authed = true;
	lws_sul_cancel(&c->sul_auth);
	hub_buf_puts(&b, "{\"type\":\"authenticated\",\"name\":");
	hub_buf_json_str(&b, c->who.name, strlen(c->who.name));
	hub_buf_puts(&b, "}");
	ctrl_buf(c, &b);
}

static void handle_message(struct st_conn *c, const char *buf, size_t len)
{
	json_error_t jerr;
	json_t *msg = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
	const char *type;

	if (!msg) {
		send_error(c, NULL, "bad_json", "%s", jerr.text);
		if (!c->authed)
			conn_close(c, CLOSE_UNAUTHORIZED, "unauthorized");
		return;
	}
	type = json_string_value(json_object_get(msg, "type"));
	if (!json_is_object(msg) || !type) {
		send_error(c, NULL, "bad_message", "a message is an object with a string type");
		if (!c->authed)
			conn_close(c, CLOSE_UNAUTHORIZED, "unauthorized");
	} else if (!strcmp(type, "auth")) {
		handle_auth(c, msg);
	} else if (!c->authed) {
		send_error(c, NULL, "unauthorized", "the first message must be auth");
		conn_close(c, CLOSE_UNAUTHORIZED, "unauthorized");
		c->hub->metrics.stream_auth_failures_total++;
	} else if (!strcmp(type, "subscribe")) {
		handle_subscribe(c, msg);
	} else if (!strcmp(type, "unsubscribe")) {
		handle_unsubscribe(c, msg);
	} else if (!strcmp(type, "ping")) {
		ctrl_push(c, "{\"type\":\"pong\"}", 15);
	} else {
		send_error(c, NULL, "unknown_type", "unknown message type \"%.64s\"", type);
	}
	json_decref(msg);
}

/* ---- lws protocol -------------------------------------------------------- */

static void auth_timeout_cb(lws_sorted_usec_list_t *sul)
{
	struct st_conn *c = lws_container_of(sul, struct st_conn, sul_auth);

	if (c->authed || !c->wsi)
		return;
	c->hub->metrics.stream_auth_failures_total++;
	send_error(c, NULL, "auth_timeout", "no auth message within %d ms",
		   c->hub->cfg.stream_auth_timeout_ms);
	conn_close(c, CLOSE_AUTH_TIMEOUT, "auth timeout");
}

static void conn_free(struct st_conn *c)
{
	struct stream *st = c->st;
	while (c->subs)
		sub_kill(c->subs);
	while (c->qlen) {
		struct st_qent *e = &c->q[c->qhead];
		msg_unref(e->msg);
		sub_unref(e->sub);
		c->qhead = (c->qhead + 1) % c->qcap;
		c->qlen--;
	}
	free(c->q);
	while (c->ctrl_head) {
		struct ctrl *m = c->ctrl_head;
		c->ctrl_head = m->next;
		free(m);
	}
	lws_sul_cancel(&c->sul_auth);
	ws_rx_free(&c->rx);
	hub_buf_free(&c->w);
	auth_principal_clear(&c->who);
	if (c->prev)
		c->prev->next = c->next;
	else
		st->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	free(c);
}

/* One piece of a client message: reassembled (at most MAX_MESSAGE_BYTES),
 * handled when complete (protocols/ws_rx.h). */
static void on_receive(struct st_conn *c, const char *in, size_t len)
{
	struct lws *wsi = c->wsi;
	struct ws_piece p = {
		in, len, lws_is_first_fragment(wsi) != 0, false, lws_frame_is_binary(wsi) != 0,
		lws_remaining_packet_payload(wsi),
	};
	const char *msg, *reason;
	size_t msglen;
	int code;

	p.final = lws_is_final_fragment(wsi) && !p.remaining;
	if (!c->rx.discarding && c->closing)
		return;
	switch (ws_rx_feed(&c->rx, &p, MAX_MESSAGE_BYTES, DISCARD_MAX_BYTES, &msg, &msglen,
			   &code, &reason)) {
	case WS_RX_MORE:
		break;
	case WS_RX_MESSAGE:
		handle_message(c, msg, msglen);
		ws_rx_done(&c->rx, 16 * 1024);
		break;
	case WS_RX_REFUSED:
		if (code == WS_CLOSE_UNSUPPORTED)
			c->hub->metrics.binary_closed[HUB_WS_DASHBOARD]++;
		if (!c->rx.discarding)
			conn_close(c, code, reason);
		break;
	case WS_RX_CLOSE:
		conn_close(c, code, reason);
		break;
	}
}

/* The upgrade at STREAM_PATH: the token may come in the Authorization
 * header (checked here: 401/403 like the HTTP API) or, for browsers, in a
 * first auth message. */
static int confirm_upgrade(struct lws *wsi, struct hub *hub, struct hub_handshake *hs, void *ctx)
{
	char authz[HUB_AUTHZ_MAX + 16], why[128];
	const char *tok;
	size_t tlen;
	enum hub_bearer b = hub_http_bearer(wsi, authz, sizeof(authz), &tok, &tlen);
	enum stream_auth rc;

	(void)ctx;
	if (b == HUB_BEARER_NONE) {
		hs->anonymous = true;
		return 0;
	}
	if (b != HUB_BEARER_OK) {
		hub->metrics.stream_auth_failures_total++;
		return hub_http_refuse_upgrade(wsi, 401, "unauthorized", hub_http_bearer_problem(b));
	}
	rc = stream_authenticate(hub, tok, tlen, &hs->who, why, sizeof(why));
	if (rc != STREAM_AUTH_OK) {
		hub->metrics.stream_auth_failures_total++;
		return hub_http_refuse_upgrade(wsi, rc == STREAM_AUTH_FORBIDDEN ? 403 : 401,
					       rc == STREAM_AUTH_FORBIDDEN ? "forbidden" : "unauthorized",
					       why);
	}
	return 0;
}

static int stream_callback(struct lws *wsi, enum lws_callback_reasons reason,
			   void *user, void *in, size_t len)
{
	struct st_pss *pss = user;
	struct st_conn *c = pss ? pss->conn : NULL;
	struct hub *hub;

	switch (reason) {
	case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION:
		return 0;
	case LWS_CALLBACK_ESTABLISHED: {
		struct hub_handshake hs;

		hub = lws_context_user(lws_get_context(wsi));
		if (!hub_http_take_handshake(wsi, STREAM_PATH, &hs))
			return -1; /* not from the /v1/stream upgrade */
		if (hub->draining) {
			auth_principal_clear(&hs.who);
			return -1;
		}
		c = hub_xcalloc(1, sizeof(*c));
		c->wsi = wsi;
		c->hub = hub;
		c->st = hub->stream;
		c->who = hs.who; /* moved */
		c->authed = !hs.anonymous;
		if (!c->authed) {
			lws_sul_schedule(hub->ctx, 0, &c->sul_auth, auth_timeout_cb,
					 (lws_usec_t)hub->cfg.stream_auth_timeout_ms * 1000);
		}
		c->next = c->st->conns;
		if (c->st->conns)
			c->st->conns->prev = c;
		c->st->conns = c;
		pss->conn = c;
		hub->metrics.stream_connections++;
		hub->metrics.stream_connections_total++;
		hub_keepalive_start(hub, &pss->ka, wsi);
		return 0;
	}
	case LWS_CALLBACK_RECEIVE:
		if (!c)
			return 0;
		c->hub->metrics.bytes_received[HUB_WS_DASHBOARD] += len;
		on_receive(c, in, len);
		return 0;
	case LWS_CALLBACK_SERVER_WRITEABLE: {
		int k;

		if (!c)
			return 0;
		if ((k = hub_keepalive_writeable(c->hub, &pss->ka)))
			return k < 0 ? -1 : 0;
		return conn_writeable(c);
	}
	case LWS_CALLBACK_RECEIVE_PONG:
		if (c)
			hub_keepalive_pong(c->hub, &pss->ka);
		return 0;
	case LWS_CALLBACK_CLOSED:
		if (c)
			hub_keepalive_stop(c->hub, &pss->ka);
		if (c) {
			pss->conn = NULL;
			c->wsi = NULL;
			c->hub->metrics.stream_connections--;
			conn_free(c);
		}
		return 0;
	default:
		return 0;
	}
}

static const struct lws_protocols stream_protocol = {
	STREAM_SUBPROTOCOL, stream_callback, sizeof(struct st_pss), 1024, 0, NULL, 0
};

/* ---- start and stop ------------------------------------------------------ */

static struct stream *stream_new(struct hub *hub, struct agg *agg)
{
	struct stream *st = hub_xcalloc(1, sizeof(*st));

	st->hub = hub;
	st->agg = agg;
	st->raw_all = group_new(st, HUB_CH_RAW "*", true);
	st->raw_all->raw = true;
	st->presence = group_new(st, HUB_CH_PRESENCE, false);
	st->presence->msg_type = "presence";
	st->commands = group_new(st, HUB_CH_COMMANDS, false);
	st->commands->msg_type = "command_status";
	st->agg_group = group_new(st, HUB_CH_AGG, false);
	st->agg_group->agg = true;
	agg_set_emit(agg, emit_aggregates, st);
	return st;
}

static void stream_close_all(struct stream *st)
{
	for (struct st_conn *c = st->conns; c; c = c->next)
		conn_close(c, LWS_CLOSE_STATUS_GOINGAWAY, "hub shutting down");
}

static void free_vec_cb(const char *key, void *value, void *arg)
{
	struct sub_vec *v = value;

	(void)key;
	(void)arg;
	free(v->v);
	free(v);
}

static void group_free(struct st_group *g)
{
	if (!g)
		return;
	hub_strmap_foreach(&g->index, free_vec_cb, NULL);
	hub_strmap_free(&g->index);
	free(g->scan.v);
	free(g->type);
	free(g->chs);
	free(g);
}

static void free_schan_cb(const char *key, void *value, void *arg)
{
	(void)key;
	(void)arg;
	free(value);
}

static void free_group_cb(const char *key, void *value, void *arg)
{
	(void)key;
	(void)arg;
	group_free(value);
}

static void stream_free(struct stream *st)
{
	if (!st)
		return;
	hub_strmap_foreach(&st->raw_typed, free_group_cb, NULL);
	hub_strmap_free(&st->raw_typed);
	hub_strmap_foreach(&st->schans, free_schan_cb, NULL);
	hub_strmap_free(&st->schans);
	group_free(st->raw_all);
	group_free(st->presence);
	group_free(st->commands);
	group_free(st->agg_group);
	free(st->cand.v);
	free(st->kick);
	free(st);
}

/* ---- the module ---------------------------------------------------------- */

static void stream_module_protocol(const struct hub *hub, struct lws_protocols *out)
{
	(void)hub;
	*out = stream_protocol;
}

static int stream_module_start(struct hub *hub, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	hub->stream = stream_new(hub, hub->agg);
	hub_http_add_upgrade(hub, STREAM_PATH, STREAM_SUBPROTOCOL, confirm_upgrade, NULL);
	return 0;
}

static void stream_module_quiesce(struct hub *hub)
{
	stream_close_all(hub->stream);
}

static void stream_module_stop(struct hub *hub)
{
	if (hub->stream)
		lws_sul_cancel(&hub->stream->sul_retry);
}

static void stream_module_free(struct hub *hub)
{
	stream_free(hub->stream);
	hub->stream = NULL;
}

const struct hub_module stream_module = {
	.name = "stream",
	.protocol = stream_module_protocol,
	.start = stream_module_start,
	.quiesce = stream_module_quiesce,
	.stop = stream_module_stop,
	.free = stream_module_free,
};
