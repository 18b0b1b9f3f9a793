/*
 * gw-sim: gateway simulator for iot-hub (the gateway side of CONTRACT.md §2).
 *
 * One process, one thread, one lws client context on the libev backend. It opens
 * N gateway connections to /v1/gateway (subprotocol iot-gateway.v1), announces M
 * devices on each, then sends telemetry frames open loop (--rate) or closed loop,
 * keeps every unacked frame in a bounded per-gateway window, resends unacked frames
 * with their original seq after a reconnect or an `unavailable` error, answers hub
 * commands, and measures frame->ack latency in a log-bucketed histogram.
 *
 * Loop rules (STYLE.md): writes only in CLIENT_WRITEABLE, one lws_write per callback
 * with LWS_PRE headroom; every queue is bounded; all timers are lws_sul; the signal
 * handler only sets a flag and calls lws_cancel_service().
 *
 * lws 4.1.6 facts this file depends on (read off the v4.1.6 sources):
 *  - lws_write() masks client payload in place, so a frame kept for resend is copied
 *    into a scratch buffer before every write.
 *  - lws_sul_schedule() does not re-arm the libev timer by itself; fd events and
 *    sul callbacks re-arm it, so the first timers are kicked with lws_cancel_service().
 *  - After an fd event the ev glue re-arms its timer with ev_timer_set() and
 *    ev_timer_start() on a watcher that is still active, which libev ignores: a sul
 *    scheduled from a socket callback, earlier than the timer already armed, fired
 *    up to 10 s late (measured). Only the timer's own callback re-arms it correctly,
 *    so a 10 ms heartbeat sul bounds that error to 10 ms (lg_heartbeat_start).
 *  - A sul callback runs with pt->inside_lws_service set: lws_context_destroy() from
 *    there is deferred until the loop breaks, then main() finishes it.
 *  - WSI_DESTROY reaches protocols[0] exactly once per wsi, also for connects that
 *    failed inside lws_client_connect_via_info(): it is the one "connection gone" hook.
 *  - Returning non-zero from CLIENT_RECEIVE skips the parser's reset of its rx
 *    buffer position, and lws keeps reading while it waits for the close ack: the
 *    rest of the frame is written past rx_ubuf (heap overflow, seen as a SEGV
 *    with an oversize message). The server-side parser resets it and guards
 *    against this; the client's does not. So RECEIVE always returns 0, and a
 *    connection is closed from WRITEABLE (gw->kill_*).
 *  - iface in lws_client_connect_info is bound (bind() before connect()) and may be
 *    an IPv4 literal; lws then forces that connection to IPv4.
 */

#define _GNU_SOURCE
#include "loadgen.h"

#include <jansson.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SIM_SUBPROTOCOL      "iot-gateway.v1"
#define SIM_ANNOUNCE_MAX     1000u   /* devices per announce message (contract) */
#define SIM_CTRL_QUEUE_MAX   64u     /* queued command_acks per gateway */
#define SIM_CMDS_MAX         32u     /* commands in progress per gateway */
#define SIM_ID_MAX           128u    /* ids match [A-Za-z0-9._:-]{1,128} */
#define SIM_TOKEN_MAX        16384u
#define SIM_BACKOFF_MIN_MS   100
#define SIM_BACKOFF_MAX_MS   5000
#define SIM_DRAIN_MS         3000    /* grace for unacked frames at stop */
#define SIM_READING_MAX      (96u + 2u * SIM_ID_MAX) /* one reading's JSON, upper bound */
#define SIM_SEQ_STRIDE       1000000000ull /* gateway i starts at seq0 + i * stride */
#define SIM_MQTT_SUBPROTOCOL "mqtt"
#define SIM_MQTT_KEEPALIVE_S 60
#define SIM_MQTT_PIDS        65535u  /* packet ids 1..65535 */
#define SIM_MQTT_HDR_MAX     (5u + 2u + 5u + SIM_ID_MAX + 2u) /* PUBLISH header */

/* ------------------------------------------------------------------------ */
/* lws logs                                                                   */

static void
lws_log_emit(int level, const char *line)
{
	size_t n = strlen(line);

	while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
		n--;
	LOG(level == LLL_ERR ? LOG_ERR : LOG_WARN, "lws: %.*s", (int)n, line);
}

/* ------------------------------------------------------------------------ */
/* configuration                                                              */

struct sim_cfg {
	const char *url;
	struct lg_endpoint ep;   /* from url */
	int tls;
	const char *ca, *cert, *key;
	int insecure;

	const char *token;
	const char *token_cmd;
	const char *jwt_secret;   /* HS256 secret file: gw-sim mints the tokens */
	const char *jwt_devices;  /* comma-separated patterns, {sub} expanded */
	uint64_t ttl;             /* s, exp = now + ttl */

	unsigned gateways;
	unsigned devices;
	const char *gw_prefix;
	const char *device_type;
	const char *labels;

	double rate;         /* readings/s per gateway, 0 = closed loop */
	unsigned batch;
	unsigned inflight;
	double duration;
	uint64_t frames;
	double bad_ratio;
	double connect_rate;
	double stats_interval;
	double ack_timeout;  /* s; 0 = wait for acks forever */
	double warmup;       /* s; frames sent earlier stay out of latency_us */
	const char *stamp_field; /* data field set to wall-clock µs at generation */
	int json_summary;
	int idle;
	int mqtt;            /* --mqtt: MQTT 3.1.1 over WebSocket (Mosquitto) */

	unsigned cmd_delay_ms;       /* before each step after `received` */
	unsigned cmd_ack_delay_ms;   /* before `received` */
	unsigned cmd_steps;          /* firmware_update progress steps */
	const char *cmd_fail, *cmd_ignore, *cmd_reject;  /* name lists */
	double cmd_fail_p, cmd_ignore_p;  /* or probabilities */

	char **src_ips;
	unsigned n_src_ips;

	size_t max_frame;
	uint64_t seq_start;
	int seq_start_set;
	uint64_t seed;
};

/* ------------------------------------------------------------------------ */
/* per-gateway state                                                          */

enum gw_state {
	GW_IDLE,        /* not started */
	GW_QUEUED,      /* waiting in the connect queue */
	GW_CONNECTING,  /* wsi exists, not yet established */
	GW_ANNOUNCING,  /* established, announce not yet fully answered */
	GW_READY,       /* announced: telemetry flows */
	GW_BACKOFF,     /* waiting for the reconnect timer */
	GW_STOPPED,
};

enum slot_state { SLOT_FREE, SLOT_PENDING, SLOT_INFLIGHT, SLOT_RETRY_WAIT };

struct frame_slot {
	uint64_t seq;
	int64_t sent_us;       /* monotonic time of the latest write */
	int64_t retry_at_us;   /* SLOT_RETRY_WAIT: when to send again */
	char *buf;             /* frame text, kept until acked */
	uint32_t len, cap;
	uint16_t nreadings;
	uint8_t state;
	uint8_t written;       /* written at least once (later writes are resends) */
};

struct ctrl_msg {
	struct ctrl_msg *next;
	size_t len;
	char data[];
};

enum cmd_action { CMD_NORMAL, CMD_FAIL, CMD_IGNORE, CMD_REJECT };

struct sim_cmd {
	struct sim_cmd *next;
	struct gw *gw;
	lws_sorted_usec_list_t sul;
	char *id;
	char *name;
	char *version;         /* firmware_update params.version, may be NULL */
	int stage;             /* 0: `received` not sent yet; 1..: steps after it */
	int action;
};

struct gw {
	unsigned idx;
	char id[SIM_ID_MAX + 1];
	const char *auth;      /* "Bearer <jwt>" */
	size_t auth_len;
	int auth_owned;

	struct lws *wsi;
	enum gw_state state;
	unsigned backoff_attempt;
	int last_close_code;
	const char *kill_reason;  /* close at the next WRITEABLE, with kill_code */
	int kill_code;
	int rx_discard;           /* dropping the rest of an oversize message */
	lws_sorted_usec_list_t sul_backoff;
	lws_sorted_usec_list_t sul_retry;
	int64_t retry_armed_at;

	/* announce */
	unsigned ann_next;     /* next device index to put in an announce */
	unsigned ann_sent;     /* announce messages sent on this connection */
	unsigned ann_replies;  /* announced (or error) replies received */
	int64_t ann_retry_ms;  /* > 0: an announce got `unavailable`: redo it */
	lws_sorted_usec_list_t sul_announce;

	/* telemetry window: slot of seq s is win[s % inflight] */
	struct frame_slot *win;
	uint64_t next_seq;     /* next seq to assign */
	uint64_t base_seq;     /* oldest seq still in the window */
	uint64_t send_cursor;  /* no PENDING slot below this seq */
	unsigned n_pending;
	unsigned n_used;
	uint64_t frames_generated;
	unsigned dev_cursor;
	int done;

	/* open loop */
	int64_t next_due_ns;
	int heap_pos;          /* -1 when not in the rate heap */

	/* rx reassembly */
	struct lg_rx rx;

	/* control messages (command acks), bounded */
	struct ctrl_msg *cq_head, *cq_tail;
	unsigned cq_len;
	struct sim_cmd *cmds;
	unsigned n_cmds;

	float *temp, *hum;     /* per-device random walk */
	uint8_t in_connq;
	uint8_t mqtt_ping;     /* --mqtt: a PINGREQ is owed */
};

/* ------------------------------------------------------------------------ */
/* counters                                                                   */

enum { RJ_INVALID, RJ_UNKNOWN_DEVICE, RJ_UNAUTHORIZED_DEVICE, RJ_RATE_LIMITED,
       RJ_CLOCK_SKEW, RJ_OTHER, RJ_COUNT };
static const char *const rj_names[RJ_COUNT] = {
	"invalid", "unknown_device", "unauthorized_device", "rate_limited",
	"clock_skew", "other"
};

struct counters {
	uint64_t frames_sent, frames_resent, frames_acked, frames_dropped;
	uint64_t readings_sent, readings_acked, readings_rejected, readings_bad;
	uint64_t rejected[RJ_COUNT];
	uint64_t unavailable, hub_errors, proto_errors, ack_mismatch, unexpected_acks;
	uint64_t duplicate_acks, announce_retries;
	uint64_t ticks_skipped;
	uint64_t connects, connect_failures, auth_failures, disconnects, takeovers;
	uint64_t ack_timeouts;
	uint64_t announce_msgs, announce_rejected;
	uint64_t cmds_received, cmd_acks_sent, cmd_acks_dropped, cancels;
	uint64_t cmds_ignored, cmds_rejected, cmds_failed, cmds_succeeded;
	uint64_t cmds_canceled;
};

#define ERRCODES_MAX 16
struct errcode {
	char name[32];
	uint64_t count;
};

/* ------------------------------------------------------------------------ */
/* global state (one simulator per process)                                   */

static struct {
	struct sim_cfg cfg;
	struct lws_context *ctx;
	struct gw *gws;
	float *temps, *hums;
	char *shared_auth;
	char *dev_type_json;
	char *labels_json;

	unsigned char *tx;   /* LWS_PRE + max_frame: every write is copied here */
	size_t tx_cap;

	/* connect queue (ring of gateway indices) and its rate limiter */
	unsigned *connq;
	unsigned cq_head, cq_count;
	struct lg_bucket conn_bucket;
	int connect_armed;
	lws_sorted_usec_list_t sul_connect;

	/* open-loop rate: min-heap on next_due_ns, one sul for the earliest */
	struct gw **heap;
	unsigned heap_n;
	int64_t interval_ns;
	int64_t rate_armed_ns;  /* 0 = not armed */
	lws_sorted_usec_list_t sul_rate;

	lws_sorted_usec_list_t sul_duration, sul_signal, sul_destroy, sul_drain,
			       sul_watchdog, sul_mqtt_ping;

	int sig_handled;
	int stopping;        /* no new frames; drain the windows */
	int closing;         /* close everything now */
	int destroy_started;
	const char *stop_reason;

	unsigned n_live, n_connected, n_ready, n_done;

	struct counters tot, iv;
	struct errcode errcodes[ERRCODES_MAX];
	unsigned n_errcodes;
	uint64_t errcodes_other;
	struct lg_hist h_tot, h_iv;
	int64_t start_us, stop_us, last_stats_us;
	uint64_t rng;
} g;

#define CNT(field, n) do { g.tot.field += (n); g.iv.field += (n); } while (0)

static void begin_stop(const char *why);
static void gw_request_write(struct gw *gw);
static void gw_after_window_change(struct gw *gw);

/* ------------------------------------------------------------------------ */
/* random numbers: xorshift64*                                                */

static uint64_t
rng_next(void)
{
	g.rng ^= g.rng >> 12;
	g.rng ^= g.rng << 25;
	g.rng ^= g.rng >> 27;
	return g.rng * 2685821657736338717ull;
}

static double
rng_unit(void)
{
	return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------------ */
/* small helpers                                                              */

static int
id_char_ok(int c)
{
	return isalnum(c) || c == '.' || c == '_' || c == ':' || c == '-';
}

static int
id_ok(const char *s, size_t maxlen)
{
	size_t n = 0;

	for (; *s; s++, n++)
		if (!id_char_ok((unsigned char)*s))
			return 0;
	return n >= 1 && n <= maxlen;
}

/* is name one of the comma-separated names in list? */
static int
name_in_list(const char *list, const char *name)
{
	size_t n = strlen(name);
	const char *p = list;

	if (!list)
		return 0;
	while (*p) {
		const char *e = strchr(p, ',');
		size_t l = e ? (size_t)(e - p) : strlen(p);

		if (l == n && !strncmp(p, name, n))
			return 1;
		if (!e)
			break;
		p = e + 1;
	}
	return 0;
}

static void
ensure_tx(size_t payload)
{
	if (LWS_PRE + payload <= g.tx_cap)
		return;
	g.tx_cap = LWS_PRE + payload;
	g.tx = lg_xrealloc(g.tx, g.tx_cap);
}

static void
count_errcode(const char *code)
{
	unsigned i;

	for (i = 0; i < g.n_errcodes; i++)
		if (!strcmp(g.errcodes[i].name, code)) {
			g.errcodes[i].count++;
			return;
		}
	if (g.n_errcodes < ERRCODES_MAX && strlen(code) < sizeof(g.errcodes[0].name)) {
		snprintf(g.errcodes[g.n_errcodes].name,
			 sizeof(g.errcodes[0].name), "%s", code);
		g.errcodes[g.n_errcodes++].count = 1;
		return;
	}
	g.errcodes_other++;
}

/* ------------------------------------------------------------------------ */
/* open-loop rate heap                                                        */

static void
heap_set(unsigned i, struct gw *gw)
{
	g.heap[i] = gw;
	gw->heap_pos = (int)i;
}

static void
heap_up(unsigned i)
{
	struct gw *gw = g.heap[i];

	while (i) {
		unsigned p = (i - 1) / 2;

		if (g.heap[p]->next_due_ns <= gw->next_due_ns)
			break;
		heap_set(i, g.heap[p]);
		i = p;
	}
	heap_set(i, gw);
}

static void
heap_down(unsigned i)
{
	struct gw *gw = g.heap[i];

	for (;;) {
		unsigned c = 2 * i + 1;

		if (c >= g.heap_n)
			break;
		if (c + 1 < g.heap_n &&
		    g.heap[c + 1]->next_due_ns < g.heap[c]->next_due_ns)
			c++;
		if (gw->next_due_ns <= g.heap[c]->next_due_ns)
			break;
		heap_set(i, g.heap[c]);
		i = c;
	}
	heap_set(i, gw);
}

static void rate_cb(lws_sorted_usec_list_t *sul);

/* make sure the rate sul fires no later than the heap's earliest due time */
static void
rate_arm(void)
{
	int64_t due, now_ns;

	if (!g.heap_n || g.stopping)
		return;
	due = g.heap[0]->next_due_ns;
	if (g.rate_armed_ns && g.rate_armed_ns <= due)
		return;
	now_ns = lg_mono_us() * 1000;
	g.rate_armed_ns = due;
	lws_sul_schedule(g.ctx, 0, &g.sul_rate, rate_cb,
			 due > now_ns ? (due - now_ns) / 1000 : 0);
}

static void
heap_push(struct gw *gw)
{
	if (gw->heap_pos >= 0)
		return;
	g.heap[g.heap_n] = gw;
	gw->heap_pos = (int)g.heap_n++;
	heap_up(g.heap_n - 1);
	rate_arm();
}

static void
heap_remove(struct gw *gw)
{
	unsigned i = (unsigned)gw->heap_pos;
	struct gw *last;

	if (gw->heap_pos < 0)
		return;
	gw->heap_pos = -1;
	last = g.heap[--g.heap_n];
	if (i == g.heap_n)
		return;
	heap_set(i, last);
	heap_up(i);
	heap_down((unsigned)last->heap_pos);
}

/* ------------------------------------------------------------------------ */
/* telemetry window                                                           */

static struct frame_slot *
gw_slot(struct gw *gw, uint64_t seq)
{
	struct frame_slot *fs;

	if (seq < gw->base_seq || seq >= gw->next_seq)
		return NULL;
	fs = &gw->win[seq % g.cfg.inflight];
	if (fs->state == SLOT_FREE || fs->seq != seq)
		return NULL;
	return fs;
}

static void
gw_slot_release(struct gw *gw, struct frame_slot *fs)
{
	if (fs->state == SLOT_PENDING)
		gw->n_pending--;
	fs->state = SLOT_FREE;
	gw->n_used--;
	while (gw->base_seq < gw->next_seq &&
	       gw->win[gw->base_seq % g.cfg.inflight].state == SLOT_FREE)
		gw->base_seq++;
	if (gw->send_cursor < gw->base_seq)
		gw->send_cursor = gw->base_seq;
}

static void
gw_slot_make_pending(struct gw *gw, struct frame_slot *fs)
{
	if (fs->state == SLOT_PENDING)
		return;
	fs->state = SLOT_PENDING;
	gw->n_pending++;
	if (fs->seq < gw->send_cursor)
		gw->send_cursor = fs->seq;
}

static struct frame_slot *
gw_next_pending(struct gw *gw)
{
	uint64_t s;

	if (!gw->n_pending)
		return NULL;
	for (s = gw->send_cursor; s < gw->next_seq; s++) {
		struct frame_slot *fs = &gw->win[s % g.cfg.inflight];

		if (fs->state == SLOT_PENDING && fs->seq == s) {
			gw->send_cursor = s;
			return fs;
		}
	}
	LOG(LOG_ERR, "%s: window bookkeeping lost a pending frame", gw->id);
	gw->n_pending = 0;
	return NULL;
}

static int
gw_can_generate(const struct gw *gw)
{
	return gw->state == GW_READY && !g.stopping && !g.cfg.idle &&
	       g.cfg.devices &&
	       (!g.cfg.frames || gw->frames_generated < g.cfg.frames) &&
	       gw->next_seq - gw->base_seq < g.cfg.inflight;
}

static size_t
frame_bound(void)
{
	/* --stamp-field adds ,"NAME":<up to 20 digits> to each reading */
	size_t stamp = g.cfg.stamp_field ? strlen(g.cfg.stamp_field) + 24 : 0;

	return 64 + (size_t)g.cfg.batch * (SIM_READING_MAX + stamp);
}

/* build the next telemetry frame into a free slot: random-walk thermostat data */
static void
gw_generate(struct gw *gw)
{
	uint64_t seq = gw->next_seq++;
	struct frame_slot *fs = &gw->win[seq % g.cfg.inflight];
	int64_t now_us = lg_wall_us(), ts = now_us / 1000;
	size_t cap = frame_bound(), off;
	unsigned r;

	if (fs->cap < cap) {
		fs->buf = lg_xrealloc(fs->buf, cap);
		fs->cap = (uint32_t)cap;
	}
	off = (size_t)snprintf(fs->buf, cap,
			"{\"type\":\"telemetry\",\"seq\":%" PRIu64 ",\"readings\":[",
			seq);
	for (r = 0; r < g.cfg.batch; r++) {
		unsigned d = gw->dev_cursor;
		float *t = &gw->temp[d], *h = &gw->hum[d];
		double temp;

		gw->dev_cursor = (d + 1) % g.cfg.devices;
		*t += (float)(0.05 * (21.0 - *t) + (rng_unit() - 0.5) * 0.4);
		*h += (float)(0.05 * (45.0 - *h) + (rng_unit() - 0.5) * 1.0);
		if (*t < -40.f)
			*t = -40.f;
		if (*t > 125.f)
			*t = 125.f;
		if (*h < 0.f)
			*h = 0.f;
		if (*h > 100.f)
			*h = 100.f;
		temp = *t;
		if (g.cfg.bad_ratio > 0 && rng_unit() < g.cfg.bad_ratio) {
			temp = 500.0;   /* over the schema's maximum 125 */
			CNT(readings_bad, 1);
		}
		off += (size_t)snprintf(fs->buf + off, cap - off,
			"%s{\"device\":\"%s-d%u\",\"ts\":%" PRId64 ",\"data\":"
			"{\"temperature\":%.2f,\"humidity\":%.2f",
			r ? "," : "", gw->id, d, ts, temp, (double)*h);
		if (g.cfg.stamp_field)   /* the same instant as ts, in µs */
			off += (size_t)snprintf(fs->buf + off, cap - off,
				",\"%s\":%" PRId64, g.cfg.stamp_field, now_us);
		off += (size_t)snprintf(fs->buf + off, cap - off, "}}");
	}
	off += (size_t)snprintf(fs->buf + off, cap - off, "]}");
	if (off >= cap) {   /* cannot happen: frame_bound() is an upper bound */
		LOG(LOG_ERR, "%s: frame buffer too small", gw->id);
		abort();
	}
	fs->len = (uint32_t)off;
	fs->seq = seq;
	fs->nreadings = (uint16_t)g.cfg.batch;
	fs->sent_us = 0;
	fs->written = 0;
	fs->state = SLOT_FREE;
	gw->n_used++;
	gw_slot_make_pending(gw, fs);
	gw->frames_generated++;
}

/* fill the window in closed loop: keep `inflight` frames outstanding */
static void
gw_fill_closed_loop(struct gw *gw)
{
	if (g.cfg.rate > 0)
		return;
	while (gw_can_generate(gw))
		gw_generate(gw);
}

static void
check_done(struct gw *gw)
{
	if (gw->done || !g.cfg.frames || g.cfg.idle)
		return;
	if (gw->frames_generated >= g.cfg.frames && !gw->n_used) {
		gw->done = 1;
		heap_remove(gw);
		LOG(LOG_INFO, "%s: all %" PRIu64 " frames acknowledged", gw->id,
		    g.cfg.frames);
		if (++g.n_done == g.cfg.gateways)
			begin_stop("every gateway sent --frames frames");
	}
}

/* after an ack, a drop or a retry: generate, write, finish or close */
static void
gw_after_window_change(struct gw *gw)
{
	check_done(gw);
	gw_fill_closed_loop(gw);
	gw_request_write(gw);
}

/* ------------------------------------------------------------------------ */
/* control queue (command acks)                                               */

static void
gw_ctrl_push(struct gw *gw, json_t *msg)
{
	struct ctrl_msg *m;
	size_t n;

	n = json_dumpb(msg, NULL, 0, JSON_COMPACT);
	if (!n || n > g.cfg.max_frame) {
		LOG(LOG_WARN, "%s: command ack not encodable, dropped", gw->id);
		CNT(cmd_acks_dropped, 1);
		return;
	}
	if (gw->cq_len >= SIM_CTRL_QUEUE_MAX) {
		LOG(LOG_WARN, "%s: control queue full (%u), command ack dropped",
		    gw->id, SIM_CTRL_QUEUE_MAX);
		CNT(cmd_acks_dropped, 1);
		return;
	}
	m = lg_xmalloc(sizeof(*m) + n);
	m->len = json_dumpb(msg, m->data, n, JSON_COMPACT);
	m->next = NULL;
	if (gw->cq_tail)
		gw->cq_tail->next = m;
	else
		gw->cq_head = m;
	gw->cq_tail = m;
	gw->cq_len++;
	gw_request_write(gw);
}

static void
gw_ctrl_clear(struct gw *gw)
{
	while (gw->cq_head) {
		struct ctrl_msg *m = gw->cq_head;

		gw->cq_head = m->next;
		free(m);
	}
	gw->cq_tail = NULL;
	gw->cq_len = 0;
}

/* ------------------------------------------------------------------------ */
/* commands                                                                   */

static void
send_cmd_ack(struct gw *gw, const char *id, const char *status,
	     const char *error, int progress, const char *message, json_t *result)
{
	json_t *m = json_pack("{s:s, s:s, s:s}", "type", "command_ack",
			      "id", id, "status", status);

	if (!m) {
		json_decref(result);
		return;
	}
	if (error)
		json_object_set_new(m, "error", json_string(error));
	if (progress >= 0)
		json_object_set_new(m, "progress", json_integer(progress));
	if (message)
		json_object_set_new(m, "message", json_string(message));
	if (result)
		json_object_set_new(m, "result", result);
	gw_ctrl_push(gw, m);
	json_decref(m);
}

static void
cmd_free(struct sim_cmd *c)
{
	lws_sul_cancel(&c->sul);
	free(c->id);
	free(c->name);
	free(c->version);
	free(c);
}

static void
cmd_unlink(struct gw *gw, struct sim_cmd *c)
{
	struct sim_cmd **pp;

	for (pp = &gw->cmds; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			gw->n_cmds--;
			return;
		}
}

/*
 * One step of a command in progress: stage 0 sends `received` (after
 * --cmd-ack-delay-ms); firmware_update then reports in_progress with progress
 * 0, 100/N, ..., 100 (N = --cmd-steps), one report per --cmd-delay-ms; the
 * last step sends the final state.
 */
static void
cmd_step_cb(lws_sorted_usec_list_t *sul)
{
	struct sim_cmd *c = lws_container_of(sul, struct sim_cmd, sul);
	struct gw *gw = c->gw;
	unsigned steps = g.cfg.cmd_steps;

	if (c->stage == 0) {
		send_cmd_ack(gw, c->id, "received", NULL, -1, NULL, NULL);
		c->stage = 1;
		lws_sul_schedule(g.ctx, 0, &c->sul, cmd_step_cb,
				 (lws_usec_t)g.cfg.cmd_delay_ms * 1000);
		return;
	}
	if (!strcmp(c->name, "firmware_update") &&
	    (unsigned)c->stage <= steps + 1) {
		unsigned k = (unsigned)c->stage - 1;

		send_cmd_ack(gw, c->id, "in_progress", NULL, (int)(k * 100 / steps),
			     k < steps ? "downloading" : "installing", NULL);
		c->stage++;
		lws_sul_schedule(g.ctx, 0, &c->sul, cmd_step_cb,
				 (lws_usec_t)g.cfg.cmd_delay_ms * 1000);
		return;
	}
	if (c->action == CMD_FAIL) {
		send_cmd_ack(gw, c->id, "failed", "simulated failure", -1, NULL, NULL);
		CNT(cmds_failed, 1);
		LOG(LOG_INFO, "%s: command %s (%s) -> failed", gw->id, c->id,
		    c->name);
	} else {
		json_t *res = NULL;

		if (!strcmp(c->name, "firmware_update"))
			res = json_pack("{s:s}", "version",
					c->version ? c->version : "");
		send_cmd_ack(gw, c->id, "succeeded", NULL, -1, NULL, res);
		CNT(cmds_succeeded, 1);
		LOG(LOG_INFO, "%s: command %s (%s) -> succeeded", gw->id,
		    c->id, c->name);
	}
	cmd_unlink(gw, c);
	cmd_free(c);
	gw_request_write(gw);
}

static void
gw_on_command(struct gw *gw, json_t *root)
{
	const char *id = json_string_value(json_object_get(root, "id"));
	const char *name = json_string_value(json_object_get(root, "name"));
	const char *dev = json_string_value(json_object_get(root, "device"));
	json_t *params = json_object_get(root, "params");
	const char *ver;
	struct sim_cmd *c;
	int action = CMD_NORMAL;

	if (!id || !name || !*id || strlen(id) > 256 || strlen(name) > 256) {
		LOG(LOG_WARN, "%s: command without a usable id/name ignored",
		    gw->id);
		CNT(proto_errors, 1);
		return;
	}
	CNT(cmds_received, 1);
	/* a probability is drawn per delivery: an ignored send may be answered
	 * when the hub resends it (attempt 2, ...) */
	if (name_in_list(g.cfg.cmd_ignore, name) ||
	    (g.cfg.cmd_ignore_p > 0 && rng_unit() < g.cfg.cmd_ignore_p))
		action = CMD_IGNORE;
	else if (name_in_list(g.cfg.cmd_reject, name))
		action = CMD_REJECT;
	else if (name_in_list(g.cfg.cmd_fail, name) ||
		 (g.cfg.cmd_fail_p > 0 && rng_unit() < g.cfg.cmd_fail_p))
		action = CMD_FAIL;
	LOG(LOG_INFO, "%s: command %s name=%s device=%s attempt=%" JSON_INTEGER_FORMAT
	    "%s", gw->id, id, name, dev ? dev : "?",
	    json_integer_value(json_object_get(root, "attempt")),
	    action == CMD_IGNORE ? " (ignored)" :
	    action == CMD_REJECT ? " (rejected)" : "");

	/* a redelivery (attempt > 1) of a command we are already working on:
	 * confirm it again (unless `received` is still to come) */
	for (c = gw->cmds; c; c = c->next)
		if (!strcmp(c->id, id)) {
			if (c->stage > 0)
				send_cmd_ack(gw, id, "received", NULL, -1, NULL, NULL);
			return;
		}

	switch (action) {
	case CMD_IGNORE:
		CNT(cmds_ignored, 1);
		return;
	case CMD_REJECT:
		CNT(cmds_rejected, 1);
		send_cmd_ack(gw, id, "rejected", "unsupported", -1, NULL, NULL);
		return;
	}

	if (gw->n_cmds >= SIM_CMDS_MAX) {
		CNT(cmds_rejected, 1);
		send_cmd_ack(gw, id, "rejected", "busy: too many commands in progress",
			     -1, NULL, NULL);
		return;
	}
	if (!g.cfg.cmd_ack_delay_ms)
		send_cmd_ack(gw, id, "received", NULL, -1, NULL, NULL);

	c = lg_xcalloc(1, sizeof(*c));
	c->gw = gw;
	c->id = lg_xstrdup(id);
	c->name = lg_xstrdup(name);
	ver = json_string_value(json_object_get(params, "version"));
	c->version = ver ? lg_xstrdup(ver) : NULL;
	c->action = action;
	c->stage = g.cfg.cmd_ack_delay_ms ? 0 : 1;
	c->next = gw->cmds;
	gw->cmds = c;
	gw->n_cmds++;
	lws_sul_schedule(g.ctx, 0, &c->sul, cmd_step_cb, (lws_usec_t)1000 *
			 (c->stage ? g.cfg.cmd_delay_ms : g.cfg.cmd_ack_delay_ms));
}

static void
gw_on_cancel(struct gw *gw, json_t *root)
{
	const char *id = json_string_value(json_object_get(root, "id"));
	struct sim_cmd *c;

	CNT(cancels, 1);
	if (!id) {
		CNT(proto_errors, 1);
		return;
	}
	for (c = gw->cmds; c; c = c->next)
		if (!strcmp(c->id, id)) {
			LOG(LOG_INFO, "%s: cancel for command %s (%s): progress "
			    "stopped", gw->id, id, c->name);
			CNT(cmds_canceled, 1);
			cmd_unlink(gw, c);
			cmd_free(c);
			gw_request_write(gw);
			return;
		}
	LOG(LOG_INFO, "%s: cancel for command %s, which is not in progress here",
	    gw->id, id);
}

/* ------------------------------------------------------------------------ */
/* hub -> gateway messages                                                    */

static void retry_cb(lws_sorted_usec_list_t *sul);

static void
gw_arm_retry(struct gw *gw, int64_t at_us)
{
	int64_t now = lg_mono_us();

	if (gw->retry_armed_at && gw->retry_armed_at <= at_us)
		return;
	gw->retry_armed_at = at_us;
	lws_sul_schedule(g.ctx, 0, &gw->sul_retry, retry_cb,
			 at_us > now ? at_us - now : 0);
}

static void
retry_cb(lws_sorted_usec_list_t *sul)
{
	struct gw *gw = lws_container_of(sul, struct gw, sul_retry);
	int64_t now = lg_mono_us(), next = 0;
	uint64_t s;

	gw->retry_armed_at = 0;
	for (s = gw->base_seq; s < gw->next_seq; s++) {
		struct frame_slot *fs = &gw->win[s % g.cfg.inflight];

		if (fs->state != SLOT_RETRY_WAIT || fs->seq != s)
			continue;
		if (fs->retry_at_us <= now)
			gw_slot_make_pending(gw, fs);
		else if (!next || fs->retry_at_us < next)
			next = fs->retry_at_us;
	}
	if (next)
		gw_arm_retry(gw, next);
	gw_request_write(gw);
}

static void
gw_become_ready(struct gw *gw)
{
	gw->state = GW_READY;
	g.n_ready++;
	gw->backoff_attempt = 0;
	LOG(LOG_DEBUG, "%s: announced, %u frame(s) to resend", gw->id,
	    gw->n_pending);
	if (g.cfg.rate > 0 && !g.cfg.idle && !gw->done) {
		/* random phase so that N gateways do not tick in lockstep */
		gw->next_due_ns = lg_mono_us() * 1000 +
			(int64_t)(rng_unit() * (double)g.interval_ns);
		heap_push(gw);
	}
	gw_after_window_change(gw);
}

static const char *
str_or(const json_t *j, const char *dflt)
{
	const char *s = json_string_value(j);

	return s ? s : dflt;
}

static void
reannounce_cb(lws_sorted_usec_list_t *sul)
{
	struct gw *gw = lws_container_of(sul, struct gw, sul_announce);

	if (gw->state != GW_ANNOUNCING)
		return;
	gw->ann_next = 0;
	gw->ann_sent = 0;
	gw->ann_replies = 0;
	gw->ann_retry_ms = 0;
	CNT(announce_retries, 1);
	gw_request_write(gw);
}

/* one reply (announced or error) per announce message, in order */
static void
gw_announce_reply(struct gw *gw)
{
	gw->ann_replies++;
	if (gw->ann_next < g.cfg.devices || gw->ann_replies < gw->ann_sent)
		return;
	if (gw->ann_retry_ms) {
		/* Redis was down for part of it: announce everything again */
		LOG(LOG_INFO, "%s: announce unavailable, again in %" PRId64 " ms",
		    gw->id, gw->ann_retry_ms);
		lws_sul_schedule(g.ctx, 0, &gw->sul_announce, reannounce_cb,
				 gw->ann_retry_ms * 1000);
		return;
	}
	gw_become_ready(gw);
}

static void
gw_on_announced(struct gw *gw, json_t *root)
{
	json_t *rej = json_object_get(root, "rejected");
	size_t nrej = json_is_array(rej) ? json_array_size(rej) : 0;

	if (gw->state != GW_ANNOUNCING) {
		LOG(LOG_DEBUG, "%s: unexpected announced", gw->id);
		return;
	}
	if (nrej) {
		json_t *first = json_array_get(rej, 0);

		CNT(announce_rejected, nrej);
		LOG(LOG_WARN, "%s: hub refused %zu device(s), first %s: %s",
		    gw->id, nrej,
		    str_or(json_object_get(first, "device"), "?"),
		    str_or(json_object_get(first, "code"), "?"));
	}
	gw_announce_reply(gw);
}

static void
gw_on_ack(struct gw *gw, json_t *root)
{
	json_t *jseq = json_object_get(root, "seq");
	json_t *jacc = json_object_get(root, "accepted");
	json_t *rej = json_object_get(root, "rejected");
	struct frame_slot *fs;
	uint64_t accepted, nrej = 0;
	size_t i;

	if (!json_is_integer(jseq) || json_integer_value(jseq) < 0) {
		CNT(proto_errors, 1);
		LOG(LOG_WARN, "%s: ack without an integer seq", gw->id);
		return;
	}
	fs = gw_slot(gw, (uint64_t)json_integer_value(jseq));
	if (!fs) {
		/* a duplicate ack, or an ack for a seq we never sent */
		CNT(unexpected_acks, 1);
		LOG(LOG_DEBUG, "%s: ack for seq %" JSON_INTEGER_FORMAT
		    " not in the window", gw->id, json_integer_value(jseq));
		return;
	}
	accepted = json_is_integer(jacc) && json_integer_value(jacc) > 0 ?
		   (uint64_t)json_integer_value(jacc) : 0;
	if (json_is_array(rej)) {
		nrej = json_array_size(rej);
		for (i = 0; i < nrej; i++) {
			const char *code = json_string_value(json_object_get(
					json_array_get(rej, i), "code"));
			int k;

			for (k = 0; k < RJ_OTHER; k++)
				if (code && !strcmp(code, rj_names[k]))
					break;
			CNT(rejected[k], 1);
		}
	}
	if (accepted + nrej != fs->nreadings) {
		CNT(ack_mismatch, 1);
		LOG(LOG_WARN, "%s: ack for seq %" PRIu64 " accounts for %" PRIu64
		    " readings, frame had %u", gw->id, fs->seq, accepted + nrej,
		    fs->nreadings);
	}
	if (fs->sent_us) {
		uint64_t lat = (uint64_t)(lg_mono_us() - fs->sent_us);

		/* --warmup: the run's latency starts after the connect ramp */
		if (fs->sent_us - g.start_us >= (int64_t)(g.cfg.warmup * 1e6))
			lg_hist_add(&g.h_tot, lat);
		lg_hist_add(&g.h_iv, lat);
	}
	if (json_is_true(json_object_get(root, "duplicate")))
		CNT(duplicate_acks, 1);   /* a resend the hub had already stored */
	CNT(frames_acked, 1);
	CNT(readings_acked, accepted);
	CNT(readings_rejected, nrej);
	gw_slot_release(gw, fs);
	gw_after_window_change(gw);
}

static void
gw_on_error(struct gw *gw, json_t *root)
{
	const char *code = json_string_value(json_object_get(root, "code"));
	const char *msg = json_string_value(json_object_get(root, "message"));
	json_t *jseq = json_object_get(root, "seq");
	struct frame_slot *fs = NULL;

	json_t *jra = json_object_get(root, "retry_after_ms");
	int64_t ra = json_is_integer(jra) ? json_integer_value(jra) : 1000;
	int unavailable = code && !strcmp(code, "unavailable");

	if (ra < 1)
		ra = 1;
	if (ra > 60000)
		ra = 60000;
	if (json_is_integer(jseq) && json_integer_value(jseq) >= 0)
		fs = gw_slot(gw, (uint64_t)json_integer_value(jseq));

	/* while announcing, an error without a seq answers an announce */
	if (!fs && !json_is_integer(jseq) && gw->state == GW_ANNOUNCING &&
	    gw->ann_replies < gw->ann_sent) {
		if (unavailable) {
			CNT(unavailable, 1);
			if (ra > gw->ann_retry_ms)
				gw->ann_retry_ms = ra;
		} else {
			CNT(hub_errors, 1);
			count_errcode(code ? code : "(none)");
			LOG(LOG_WARN, "%s: hub error %s%s%s answering an announce",
			    gw->id, code ? code : "(no code)", msg ? ": " : "",
			    msg ? msg : "");
		}
		gw_announce_reply(gw);
		return;
	}

	if (unavailable) {
		CNT(unavailable, 1);
		LOG(LOG_DEBUG, "%s: seq %" JSON_INTEGER_FORMAT " unavailable, "
		    "retry in %" PRId64 " ms", gw->id,
		    json_integer_value(jseq), ra);
		if (!fs)
			return;
		if (fs->state == SLOT_PENDING)
			gw->n_pending--;
		fs->state = SLOT_RETRY_WAIT;
		fs->retry_at_us = lg_mono_us() + ra * 1000;
		gw_arm_retry(gw, fs->retry_at_us);
		return;
	}

	CNT(hub_errors, 1);
	count_errcode(code ? code : "(none)");
	LOG(LOG_WARN, "%s: hub error %s%s%s (seq %s)", gw->id,
	    code ? code : "(no code)", msg ? ": " : "", msg ? msg : "",
	    fs ? "in window, frame dropped" : "none");
	if (fs) {
		/* the hub will never ack this frame: drop it from the window */
		CNT(frames_dropped, 1);
		gw_slot_release(gw, fs);
		gw_after_window_change(gw);
	}
}

static void
gw_handle_msg(struct gw *gw, const char *buf, size_t len)
{
	json_error_t jerr;
	json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
	const char *type;

	if (!json_is_object(root)) {
		CNT(proto_errors, 1);
		LOG(LOG_WARN, "%s: unparsable message from hub: %s", gw->id,
		    root ? "not an object" : jerr.text);
		json_decref(root);
		return;
	}
	type = json_string_value(json_object_get(root, "type"));
	if (!type) {
		CNT(proto_errors, 1);
		LOG(LOG_WARN, "%s: message without a type", gw->id);
	} else if (!strcmp(type, "ack"))
		gw_on_ack(gw, root);
	else if (!strcmp(type, "announced"))
		gw_on_announced(gw, root);
	else if (!strcmp(type, "error"))
		gw_on_error(gw, root);
	else if (!strcmp(type, "command"))
		gw_on_command(gw, root);
	else if (!strcmp(type, "cancel"))
		gw_on_cancel(gw, root);
	else
		LOG(LOG_DEBUG, "%s: ignoring message type %s", gw->id, type);
	json_decref(root);
}

/* ------------------------------------------------------------------------ */
/* connection lifecycle                                                       */

static void connect_pump_cb(lws_sorted_usec_list_t *sul);

static void
connect_arm(int64_t delay_us)
{
	if (g.connect_armed || g.stopping)
		return;
	g.connect_armed = 1;
	lws_sul_schedule(g.ctx, 0, &g.sul_connect, connect_pump_cb, delay_us);
}

static void
gw_enqueue_connect(struct gw *gw)
{
	if (gw->in_connq || g.stopping)
		return;
	gw->in_connq = 1;
	gw->state = GW_QUEUED;
	g.connq[(g.cq_head + g.cq_count++) % g.cfg.gateways] = gw->idx;
	connect_arm(0);
}

static void gw_lost(struct gw *gw, const char *why);

static void
gw_connect(struct gw *gw)
{
	struct lws_client_connect_info ci;
	struct lws *wsi;

	lg_connect_info(&ci, g.ctx, &g.cfg.ep,
			g.cfg.mqtt ? SIM_MQTT_SUBPROTOCOL : SIM_SUBPROTOCOL, gw,
			&gw->wsi);
	if (g.cfg.tls) {
		ci.ssl_connection = LCCSCF_USE_SSL;
		if (g.cfg.insecure)
			ci.ssl_connection |= LCCSCF_ALLOW_SELFSIGNED |
				LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK |
				LCCSCF_ALLOW_EXPIRED | LCCSCF_ALLOW_INSECURE;
	}
	if (g.cfg.n_src_ips)
		ci.iface = g.cfg.src_ips[gw->idx % g.cfg.n_src_ips];

	gw->state = GW_CONNECTING;
	gw->wsi = NULL;
	gw->last_close_code = 0;
	gw->kill_reason = NULL;
	gw->kill_code = 0;
	gw->rx_discard = 0;
	g.n_live++;
	wsi = lws_client_connect_via_info(&ci);
	/*
	 * NULL with the state still CONNECTING: lws gave up before any callback
	 * (lws suppresses CONNECTION_ERROR inside this call). If WSI_DESTROY
	 * already ran, gw_lost() has moved the state on.
	 */
	if (!wsi) {
		CNT(connect_failures, 1);
		if (gw->state == GW_CONNECTING)
			gw_lost(gw, "connect failed");
	}
}

static void
connect_pump_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	g.connect_armed = 0;
	if (g.stopping)
		return;
	lg_bucket_refill(&g.conn_bucket, lg_mono_us());

	while (g.cq_count && lg_bucket_take(&g.conn_bucket)) {
		struct gw *gw = &g.gws[g.connq[g.cq_head]];

		g.cq_head = (g.cq_head + 1) % g.cfg.gateways;
		g.cq_count--;
		gw->in_connq = 0;
		if (gw->state == GW_QUEUED)
			gw_connect(gw);
	}
	if (g.cq_count) {
		double wait = lg_bucket_wait_us(&g.conn_bucket);

		connect_arm(wait < 1000 ? 1000 : (int64_t)wait);
	}
}

static void
backoff_cb(lws_sorted_usec_list_t *sul)
{
	struct gw *gw = lws_container_of(sul, struct gw, sul_backoff);

	if (gw->state == GW_BACKOFF)
		gw_enqueue_connect(gw);
}

static void destroy_cb(lws_sorted_usec_list_t *sul);

/*
 * The gateway's connection is gone (failed connect, close, takeover, context
 * destroy). Idempotent. Unacked frames become pending again so that they are
 * resent, with their original seq, before any new frame.
 */
static void
gw_lost(struct gw *gw, const char *why)
{
	int64_t base, delay;
	uint64_t s;

	if (gw->state != GW_CONNECTING && gw->state != GW_ANNOUNCING &&
	    gw->state != GW_READY)
		return;
	if (gw->state == GW_READY)
		g.n_ready--;
	if (gw->state != GW_CONNECTING) {
		g.n_connected--;
		if (!g.stopping)   /* closes we start at stop are not disconnects */
			CNT(disconnects, 1);
	}
	g.n_live--;
	gw->wsi = NULL;
	gw->rx.len = 0;
	heap_remove(gw);
	lws_sul_cancel(&gw->sul_retry);
	lws_sul_cancel(&gw->sul_announce);
	gw->retry_armed_at = 0;
	for (s = gw->base_seq; s < gw->next_seq; s++) {
		struct frame_slot *fs = &gw->win[s % g.cfg.inflight];

		if (fs->state == SLOT_INFLIGHT || fs->state == SLOT_RETRY_WAIT)
			gw_slot_make_pending(gw, fs);
	}
	gw->send_cursor = gw->base_seq;

	if (g.stopping) {
		gw->state = GW_STOPPED;
		if (!g.n_live && !g.destroy_started)
			lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb, 0);
		return;
	}

	base = (int64_t)SIM_BACKOFF_MIN_MS << (gw->backoff_attempt < 6 ?
					       gw->backoff_attempt : 6);
	if (base > SIM_BACKOFF_MAX_MS)
		base = SIM_BACKOFF_MAX_MS;
	gw->backoff_attempt++;
	/* "equal jitter": half fixed, half random */
	delay = base * 500 + (int64_t)(rng_unit() * (double)base * 500.0);
	gw->state = GW_BACKOFF;
	LOG(LOG_INFO, "%s: %s; reconnecting in %" PRId64 " ms with %u unacked "
	    "frame(s)", gw->id, why, delay / 1000, gw->n_used);
	lws_sul_schedule(g.ctx, 0, &gw->sul_backoff, backoff_cb, delay);
}

/* close the connection from the next WRITEABLE (never from RECEIVE) */
static void
gw_kill(struct gw *gw, int code, const char *reason)
{
	if (gw->kill_reason)
		return;
	gw->kill_code = code;
	gw->kill_reason = reason;
	gw_request_write(gw);
}

/* at stop, a gateway closes once nothing it owes the hub is outstanding */
static int
gw_drained(const struct gw *gw)
{
	return !gw->n_used && !gw->cq_len && !gw->n_cmds;
}

static void
gw_request_write(struct gw *gw)
{
	if (!gw->wsi || (gw->state != GW_ANNOUNCING && gw->state != GW_READY))
		return;
	if (g.closing || gw->kill_reason || (g.stopping && gw_drained(gw)) ||
	    gw->n_pending || (gw->state == GW_READY && gw->cq_head) ||
	    (gw->state == GW_ANNOUNCING && (g.cfg.mqtt ? !gw->ann_sent :
					     gw->ann_next < g.cfg.devices)))
		lws_callback_on_writable(gw->wsi);
}

/* next announce message: up to 1000 devices and at most max_frame bytes */
static size_t
build_announce(struct gw *gw, char *out, size_t cap)
{
	size_t off, n;
	unsigned count = 0;

	off = (size_t)snprintf(out, cap, "{\"type\":\"announce\",\"devices\":[");
	while (gw->ann_next < g.cfg.devices && count < SIM_ANNOUNCE_MAX) {
		char dev[SIM_READING_MAX + 512];

		n = (size_t)snprintf(dev, sizeof(dev),
			"%s{\"device\":\"%s-d%u\",\"device_type\":%s%s%s}",
			count ? "," : "", gw->id, gw->ann_next, g.dev_type_json,
			g.labels_json ? ",\"labels\":" : "",
			g.labels_json ? g.labels_json : "");
		if (n >= sizeof(dev) || off + n + 2 > cap)
			break;
		memcpy(out + off, dev, n);
		off += n;
		count++;
		gw->ann_next++;
	}
	out[off++] = ']';
	out[off++] = '}';
	return count ? off : 0;
}

/* ------------------------------------------------------------------------ */
/* --mqtt: MQTT 3.1.1 over WebSocket                                          */
/*
 * The same gateways, windows and latency histogram, another wire: the
 * "announce" is CONNECT (answered by CONNACK), each telemetry frame's JSON is
 * the payload of one PUBLISH QoS 1 to tele/<gateway>, and the PUBACK of its
 * packet id is its ack (every reading counts as accepted: a broker does not
 * validate). Packet id of seq s: s % 65535 + 1; the window is at most 65535
 * frames wide, so a PUBACK names exactly one seq in it. MQTT packets may span
 * or share WebSocket messages: gw->rx is a byte stream here.
 */

static size_t
mqtt_build_connect(const struct gw *gw, unsigned char *o)
{
	return lg_mqtt_connect(o, gw->id, strlen(gw->id), SIM_MQTT_KEEPALIVE_S);
}

/* PUBLISH QoS 1 of fs into o (room: SIM_MQTT_HDR_MAX + fs->len) */
static size_t
mqtt_build_publish(const struct gw *gw, const struct frame_slot *fs,
		   unsigned char *o)
{
	size_t idl = strlen(gw->id), tl = 5 + idl, n = 0;
	unsigned pid = (unsigned)(fs->seq % SIM_MQTT_PIDS) + 1;

	o[n++] = (unsigned char)(0x32 | (fs->written ? 0x08 : 0));  /* DUP */
	n += lg_mqtt_varint(o + n, 2 + tl + 2 + fs->len);
	o[n++] = (unsigned char)(tl >> 8);
	o[n++] = (unsigned char)(tl & 0xff);
	memcpy(o + n, "tele/", 5);
	memcpy(o + n + 5, gw->id, idl);
	n += tl;
	o[n++] = (unsigned char)(pid >> 8);
	o[n++] = (unsigned char)(pid & 0xff);
	memcpy(o + n, fs->buf, fs->len);
	return n + fs->len;
}

/* A frame (telemetry or MQTT PUBLISH) went out whole: it now waits for its
 * ack; a second write of the same slot is a resend. */
static void
frame_written(struct gw *gw, struct frame_slot *fs)
{
	fs->state = SLOT_INFLIGHT;
	fs->sent_us = lg_mono_us();
	gw->n_pending--;
	gw->send_cursor = fs->seq + 1;
	CNT(frames_sent, 1);
	if (fs->written)
		CNT(frames_resent, 1);
	else
		CNT(readings_sent, fs->nreadings);
	fs->written = 1;
}

static int
mqtt_writeable(struct gw *gw, struct lws *wsi, unsigned char *p)
{
	struct frame_slot *fs = NULL;
	size_t len;
	int n, connect = 0;

	if (gw->state == GW_ANNOUNCING) {
		if (gw->ann_sent)
			return 0;
		len = mqtt_build_connect(gw, p);
		connect = 1;
	} else if (gw->state == GW_READY && gw->mqtt_ping) {
		p[0] = 0xc0;   /* PINGREQ */
		p[1] = 0;
		len = 2;
	} else if (gw->state == GW_READY && (fs = gw_next_pending(gw))) {
		len = mqtt_build_publish(gw, fs, p);
	} else
		return 0;

	n = lws_write(wsi, p, len, LWS_WRITE_BINARY);
	if (n < (int)len) {
		LOG(LOG_WARN, "%s: lws_write failed (%d of %zu)", gw->id, n, len);
		return -1;
	}
	if (connect) {
		gw->ann_sent++;
		CNT(announce_msgs, 1);
	} else if (!fs) {
		gw->mqtt_ping = 0;
	} else {
		frame_written(gw, fs);
	}
	gw_request_write(gw);
	return 0;
}

static void
mqtt_on_puback(struct gw *gw, unsigned pid)
{
	struct frame_slot *fs = NULL;

	if (pid >= 1 && pid <= SIM_MQTT_PIDS && gw->base_seq < gw->next_seq) {
		uint64_t off = ((uint64_t)(pid - 1) + SIM_MQTT_PIDS -
				gw->base_seq % SIM_MQTT_PIDS) % SIM_MQTT_PIDS;

		fs = gw_slot(gw, gw->base_seq + off);
	}
	if (!fs) {
		CNT(unexpected_acks, 1);
		LOG(LOG_DEBUG, "%s: PUBACK %u not in the window", gw->id, pid);
		return;
	}
	if (fs->sent_us) {
		uint64_t lat = (uint64_t)(lg_mono_us() - fs->sent_us);

		if (fs->sent_us - g.start_us >= (int64_t)(g.cfg.warmup * 1e6))
			lg_hist_add(&g.h_tot, lat);
		lg_hist_add(&g.h_iv, lat);
	}
	CNT(frames_acked, 1);
	CNT(readings_acked, fs->nreadings);
	gw_slot_release(gw, fs);
	gw_after_window_change(gw);
}

/* one whole MQTT packet from the broker: type byte, body */
static void
mqtt_packet(struct gw *gw, unsigned type, const unsigned char *b, size_t n)
{
	switch (type >> 4) {
	case 2:   /* CONNACK: flags, return code */
		if (gw->state != GW_ANNOUNCING || n < 2) {
			CNT(proto_errors, 1);
			return;
		}
		if (b[1]) {
			CNT(hub_errors, 1);
			if (b[1] == 4 || b[1] == 5)
				CNT(auth_failures, 1);
			count_errcode(b[1] == 4 || b[1] == 5 ? "connack_not_authorized"
							     : "connack_refused");
			LOG(LOG_WARN, "%s: broker refused CONNECT (return code %u)",
			    gw->id, b[1]);
			gw_kill(gw, LWS_CLOSE_STATUS_NORMAL, "connect refused");
			return;
		}
		gw->ann_replies++;
		gw_become_ready(gw);
		break;
	case 4:   /* PUBACK */
		if (n < 2) {
			CNT(proto_errors, 1);
			return;
		}
		mqtt_on_puback(gw, ((unsigned)b[0] << 8) | b[1]);
		break;
	case 13:  /* PINGRESP */
		break;
	default:
		LOG(LOG_DEBUG, "%s: ignoring MQTT packet type %u", gw->id, type >> 4);
		break;
	}
}

/* must always return 0: see the lws 4.1.6 notes at the top */
static int
mqtt_receive(struct gw *gw, const void *in, size_t len)
{
	struct lg_rx *rx = &gw->rx;
	size_t off = 0;

	if (gw->kill_reason)
		return 0;
	if (rx->len + len > rx->cap) {
		rx->cap = rx->len + len > 4096 ? rx->len + len : 4096;
		rx->buf = lg_xrealloc(rx->buf, rx->cap);
	}
	memcpy(rx->buf + rx->len, in, len);
	rx->len += len;
	for (;;) {
		const unsigned char *b = (const unsigned char *)rx->buf + off;
		size_t avail = rx->len - off, rl = 0, h = 1;
		unsigned shift = 0;

		if (avail < 2)
			break;
		while (h < avail && h <= 4) {
			rl |= (size_t)(b[h] & 0x7f) << shift;
			shift += 7;
			if (!(b[h++] & 0x80))
				break;
		}
		if (h > 4 && (b[4] & 0x80)) {
			CNT(proto_errors, 1);
			gw_kill(gw, LWS_CLOSE_STATUS_PROTOCOL_ERR, "bad MQTT length");
			rx->len = 0;
			return 0;
		}
		if ((b[h - 1] & 0x80) || avail - h < rl) {
			if (rl > g.cfg.max_frame) {
				CNT(proto_errors, 1);
				gw->rx_discard = 1;
				gw_kill(gw, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE,
					"message too large");
				rx->len = 0;
				return 0;
			}
			break;   /* the rest of the packet comes later */
		}
		mqtt_packet(gw, b[0], b + h, rl);
		off += h + rl;
	}
	if (off) {
		memmove(rx->buf, rx->buf + off, rx->len - off);
		rx->len -= off;
	}
	return 0;
}

/* keepalive: a PINGREQ every 30 s (the broker drops a client silent 90 s) */
static void
mqtt_ping_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	(void)sul;
	for (i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];

		if (gw->state == GW_READY && gw->wsi) {
			gw->mqtt_ping = 1;
			lws_callback_on_writable(gw->wsi);
		}
	}
	if (!g.stopping)
		lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
				 SIM_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
}

static int
gw_writeable(struct gw *gw, struct lws *wsi)
{
	unsigned char *p;
	struct frame_slot *fs = NULL;
	struct ctrl_msg *cm = NULL;
	size_t len = 0;
	int n, announce = 0;

	if (gw->kill_reason) {
		lws_close_reason(wsi, (enum lws_close_status)gw->kill_code,
				 (unsigned char *)gw->kill_reason,
				 strlen(gw->kill_reason));
		return -1;
	}
	if (g.closing || (g.stopping && gw_drained(gw)) ||
	    (g.stopping && gw->state != GW_READY)) {
		lws_close_reason(wsi, LWS_CLOSE_STATUS_NORMAL,
				 (unsigned char *)"simulator stopping", 18);
		return -1;
	}

	ensure_tx(g.cfg.max_frame + SIM_MQTT_HDR_MAX);
	p = g.tx + LWS_PRE;
	if (g.cfg.mqtt)
		return mqtt_writeable(gw, wsi, p);
	if (gw->state == GW_ANNOUNCING) {
		if (gw->ann_next >= g.cfg.devices)
			return 0;
		len = build_announce(gw, (char *)p, g.cfg.max_frame);
		if (!len) {
			LOG(LOG_ERR, "%s: one device does not fit in --max-frame",
			    gw->id);
			return -1;
		}
		announce = 1;
	} else if (gw->state == GW_READY && gw->cq_head) {
		cm = gw->cq_head;
		memcpy(p, cm->data, cm->len);
		len = cm->len;
	} else if (gw->state == GW_READY && (fs = gw_next_pending(gw))) {
		/* lws masks the payload in place: write a copy, keep the frame */
		memcpy(p, fs->buf, fs->len);
		len = fs->len;
	} else
		return 0;

	n = lws_write(wsi, p, len, LWS_WRITE_TEXT);
	if (n < (int)len) {
		LOG(LOG_WARN, "%s: lws_write failed (%d of %zu)", gw->id, n, len);
		return -1;
	}

	if (announce) {
		gw->ann_sent++;
		CNT(announce_msgs, 1);
	} else if (cm) {
		gw->cq_head = cm->next;
		if (!gw->cq_head)
			gw->cq_tail = NULL;
		gw->cq_len--;
		free(cm);
		CNT(cmd_acks_sent, 1);
	} else {
		frame_written(gw, fs);
	}
	gw_request_write(gw);
	return 0;
}

static void
gw_established(struct gw *gw)
{
	gw->state = GW_ANNOUNCING;
	g.n_connected++;
	CNT(connects, 1);
	gw->ann_next = 0;
	gw->ann_sent = 0;
	gw->ann_replies = 0;
	gw->ann_retry_ms = 0;
	gw->rx.len = 0;
	LOG(LOG_DEBUG, "%s: connected", gw->id);
	if (g.stopping) {
		lws_callback_on_writable(gw->wsi);
		return;
	}
	if (!g.cfg.devices && !g.cfg.mqtt) {
		gw_become_ready(gw);
		return;
	}
	gw_request_write(gw);   /* --mqtt: CONNECT, then CONNACK makes it ready */
}

/* must always return 0: see the lws 4.1.6 notes at the top */
static int
gw_receive(struct gw *gw, struct lws *wsi, const char *in, size_t len)
{
	const char *m;
	size_t n;
	int r;

	if (gw->rx_discard || gw->kill_reason)
		return 0;
	r = lg_rx_feed(&gw->rx, in, len, lws_is_final_fragment(wsi),
		       g.cfg.max_frame, &m, &n);
	if (r < 0) {
		LOG(LOG_WARN, "%s: hub message over --max-frame %zu bytes, closing "
		    "1009", gw->id, g.cfg.max_frame);
		CNT(proto_errors, 1);
		gw->rx_discard = 1;
		gw_kill(gw, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE, "message too large");
	} else if (r)
		gw_handle_msg(gw, m, n);
	return 0;
}

static void signal_work_cb(lws_sorted_usec_list_t *sul);

static int
sim_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
	     void *in, size_t len)
{
	struct gw *gw;

	(void)user;

	if (reason == LWS_CALLBACK_EVENT_WAIT_CANCELLED) {
		if (lg_signal_count() != g.sig_handled && !g.destroy_started)
			lws_sul_schedule(g.ctx, 0, &g.sul_signal,
					 signal_work_cb, 0);
		return 0;
	}
	/* ignore lws-internal wsis and a gateway's stale wsi */
	gw = lg_client_owner(wsi, reason);
	if (!gw || gw->wsi != wsi)
		return 0;

	switch (reason) {
	case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
		unsigned char **p = (unsigned char **)in, *end = *p + len;

		if (!gw->auth)   /* --mqtt without a token */
			break;
		if (lws_add_http_header_by_name(wsi,
				(const unsigned char *)"authorization:",
				(const unsigned char *)gw->auth,
				(int)gw->auth_len, p, end)) {
			LOG(LOG_ERR, "%s: token does not fit in the handshake "
			    "buffer", gw->id);
			return -1;
		}
		break;
	}

	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR: {
		const char *why = in ? (const char *)in : "unknown";

		CNT(connect_failures, 1);
		if (strstr(why, "unauthorized"))
			CNT(auth_failures, 1);
		LOG(LOG_WARN, "%s: connection failed: %s", gw->id, why);
		break;
	}

	case LWS_CALLBACK_CLIENT_ESTABLISHED:
		gw_established(gw);
		break;

	case LWS_CALLBACK_CLIENT_RECEIVE:
		if (g.cfg.mqtt)
			return mqtt_receive(gw, in, len);
		return gw_receive(gw, wsi, in, len);

	case LWS_CALLBACK_CLIENT_WRITEABLE:
		return gw_writeable(gw, wsi);

	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
		if (len >= 2) {
			const unsigned char *b = in;

			gw->last_close_code = (b[0] << 8) | b[1];
		}
		if (gw->last_close_code == 4001) {
			CNT(takeovers, 1);
			LOG(LOG_WARN, "%s: taken over by another connection with "
			    "the same sub (close 4001: %.*s)", gw->id,
			    len > 2 ? (int)(len - 2) : 0,
			    len > 2 ? (const char *)in + 2 : "");
		} else
			LOG(LOG_INFO, "%s: hub closed with %d: %.*s", gw->id,
			    gw->last_close_code,
			    len > 2 ? (int)(len - 2) : 0,
			    len > 2 ? (const char *)in + 2 : "");
		break;

	case LWS_CALLBACK_CLIENT_CLOSED:
		LOG(LOG_DEBUG, "%s: closed (code %d)", gw->id,
		    gw->last_close_code);
		break;

	case LWS_CALLBACK_WSI_DESTROY: {
		char why[64];

		if (gw->last_close_code)
			snprintf(why, sizeof(why), "closed with %d",
				 gw->last_close_code);
		else
			snprintf(why, sizeof(why), "%s",
				 gw->state == GW_CONNECTING ? "connect failed" :
				 "connection lost");
		gw_lost(gw, why);
		break;
	}

	default:
		break;
	}
	return 0;
}

static const struct lws_protocols sim_protocols[] = {
	{ SIM_SUBPROTOCOL, sim_callback, 0, 1024, 0, NULL, 0 },
	{ SIM_MQTT_SUBPROTOCOL, sim_callback, 0, 1024, 0, NULL, 0 },
	{ NULL, NULL, 0, 0, 0, NULL, 0 }
};

/* ------------------------------------------------------------------------ */
/* timers: rate, stats, stop                                                  */

static void
gw_tick(struct gw *gw, int64_t now_ns)
{
	int gen = 0;

	if (now_ns - gw->next_due_ns > 1000000000ll) {
		/* more than 1 s behind (a stalled loop): skip, do not burst */
		uint64_t behind = (uint64_t)((now_ns - gw->next_due_ns) /
					     g.interval_ns);

		CNT(ticks_skipped, behind);
		gw->next_due_ns += (int64_t)behind * g.interval_ns;
	}
	while (gw->next_due_ns <= now_ns) {
		if (g.cfg.frames && gw->frames_generated >= g.cfg.frames) {
			heap_remove(gw);
			return;
		}
		if (gw_can_generate(gw)) {
			gw_generate(gw);
			gen = 1;
		} else
			CNT(ticks_skipped, 1);   /* window full: open loop drops */
		gw->next_due_ns += g.interval_ns;
	}
	if (gen)
		gw_request_write(gw);
}

static void
rate_cb(lws_sorted_usec_list_t *sul)
{
	int64_t now_ns = lg_mono_us() * 1000;

	(void)sul;
	g.rate_armed_ns = 0;
	if (g.stopping)
		return;
	while (g.heap_n && g.heap[0]->next_due_ns <= now_ns) {
		struct gw *gw = g.heap[0];

		gw_tick(gw, now_ns);
		if (gw->heap_pos >= 0)
			heap_down((unsigned)gw->heap_pos);
	}
	rate_arm();
}

static void
print_stats_line(int64_t now)
{
	double dt = (double)(now - g.last_stats_us) / 1e6;
	uint64_t unacked = 0;
	unsigned i;

	for (i = 0; i < g.cfg.gateways; i++)
		unacked += g.gws[i].n_used;
	if (dt <= 0)
		dt = 1e-9;
	fprintf(stderr,
		"[%7.1fs] conn %u/%u ready %u | sent %.0f f/s (resent %" PRIu64
		") | acked %.0f r/s | unacked %" PRIu64 " | rej %" PRIu64
		" | err %" PRIu64
		" | unavail %" PRIu64 " | cfail %" PRIu64 " disc %" PRIu64
		" | p50 %.2f p99 %.2f ms\n",
		(double)(now - g.start_us) / 1e6, g.n_connected, g.cfg.gateways,
		g.n_ready, (double)g.iv.frames_sent / dt, g.iv.frames_resent,
		(double)g.iv.readings_acked / dt, unacked, g.iv.readings_rejected,
		g.iv.hub_errors + g.iv.proto_errors, g.iv.unavailable,
		g.iv.connect_failures, g.iv.disconnects,
		(double)lg_hist_quantile(&g.h_iv, 0.50) / 1000.0,
		(double)lg_hist_quantile(&g.h_iv, 0.99) / 1000.0);
	memset(&g.iv, 0, sizeof(g.iv));
	lg_hist_reset(&g.h_iv);
	g.last_stats_us = now;
}

/* once a second: a connection whose oldest unacked frame is older than
 * --ack-timeout is closed; the reconnect resends the frame */
static void
watchdog_cb(lws_sorted_usec_list_t *sul)
{
	int64_t now = lg_mono_us(), limit = (int64_t)(g.cfg.ack_timeout * 1e6);
	unsigned i;

	(void)sul;
	for (i = 0; i < g.cfg.gateways && !g.stopping; i++) {
		struct gw *gw = &g.gws[i];
		uint64_t s;

		if (gw->state != GW_READY || gw->kill_reason || !gw->n_used)
			continue;
		for (s = gw->base_seq; s < gw->next_seq; s++) {
			struct frame_slot *fs = &gw->win[s % g.cfg.inflight];

			if (fs->state != SLOT_INFLIGHT || fs->seq != s)
				continue;
			if (now - fs->sent_us > limit) {
				CNT(ack_timeouts, 1);
				LOG(LOG_WARN, "%s: no ack for seq %" PRIu64 " in %.1f s, "
				    "reconnecting", gw->id, s, g.cfg.ack_timeout);
				gw_kill(gw, LWS_CLOSE_STATUS_GOINGAWAY, "ack timeout");
			}
			break;   /* the oldest in-flight frame decides */
		}
	}
	if (!g.stopping)
		lws_sul_schedule(g.ctx, 0, &g.sul_watchdog, watchdog_cb,
				 LWS_USEC_PER_SEC);
}

static void
duration_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	begin_stop("--duration elapsed");
}

static void
destroy_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	(void)sul;
	if (g.destroy_started)
		return;
	g.destroy_started = 1;
	/* no gateway timer may outlive the context */
	for (i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];
		struct sim_cmd *c;

		lws_sul_cancel(&gw->sul_backoff);
		lws_sul_cancel(&gw->sul_retry);
		lws_sul_cancel(&gw->sul_announce);
		for (c = gw->cmds; c; c = c->next)
			lws_sul_cancel(&c->sul);
	}
	lws_sul_cancel(&g.sul_rate);
	lws_sul_cancel(&g.sul_connect);
	lg_stats_stop();
	lws_sul_cancel(&g.sul_duration);
	lws_sul_cancel(&g.sul_drain);
	lws_sul_cancel(&g.sul_signal);
	lws_sul_cancel(&g.sul_watchdog);
	lws_sul_cancel(&g.sul_mqtt_ping);
	lg_heartbeat_stop();
	/* from a sul, lws defers this until the loop unwinds; main() finishes it */
	lws_context_destroy(g.ctx);
}

static void
close_all(void)
{
	unsigned i;

	for (i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];

		if (!gw->wsi)
			continue;
		if (gw->state == GW_CONNECTING)
			lws_set_timeout(gw->wsi, PENDING_TIMEOUT_USER_OK,
					LWS_TO_KILL_ASYNC);
		else
			lws_callback_on_writable(gw->wsi);
	}
}

static void
drain_cb(lws_sorted_usec_list_t *sul)
{
	if (g.n_live && sul)
		LOG(LOG_WARN, "stop: %u connection(s) still had unacked frames "
		    "or commands in progress after %d ms, closing", g.n_live,
		    SIM_DRAIN_MS);
	g.closing = 1;
	close_all();
	/* backstop: if the hub never completes the closing handshakes */
	lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb, 2 * LWS_USEC_PER_SEC);
}

/*
 * Stop: no new frames; connections whose window is empty close with 1000, the
 * others wait up to SIM_DRAIN_MS for their acks. The context is destroyed when
 * the last connection is gone.
 */
static void
begin_stop(const char *why)
{
	unsigned i;

	if (g.stopping)
		return;
	g.stopping = 1;
	g.stop_reason = why;
	g.stop_us = lg_mono_us();
	LOG(LOG_INFO, "stopping: %s", why);
	lws_sul_cancel(&g.sul_rate);
	lws_sul_cancel(&g.sul_connect);
	lws_sul_cancel(&g.sul_duration);
	lg_stats_stop();
	lws_sul_cancel(&g.sul_watchdog);
	g.rate_armed_ns = 0;
	g.connect_armed = 0;
	while (g.heap_n)
		heap_remove(g.heap[0]);
	for (i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];

		if (gw->state == GW_BACKOFF || gw->state == GW_QUEUED ||
		    gw->state == GW_IDLE) {
			lws_sul_cancel(&gw->sul_backoff);
			gw->in_connq = 0;
			gw->state = GW_STOPPED;
		}
	}
	g.cq_count = 0;
	close_all();
	if (!g.n_live)
		lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb, 0);
	else
		lws_sul_schedule(g.ctx, 0, &g.sul_drain, drain_cb,
				 (lws_usec_t)SIM_DRAIN_MS * 1000);
}

static void
signal_work_cb(lws_sorted_usec_list_t *sul)
{
	int n = lg_signal_count();

	(void)sul;
	if (n == g.sig_handled)
		return;
	g.sig_handled = n;
	if (!g.stopping)
		begin_stop("signal");
	else if (!g.closing) {
		LOG(LOG_WARN, "second signal: closing without waiting for acks");
		lws_sul_cancel(&g.sul_drain);
		drain_cb(NULL);
	}
}

/* ------------------------------------------------------------------------ */
/* summary                                                                    */

static void
print_summary(void)
{
	double el = (double)((g.stop_us ? g.stop_us : lg_mono_us()) - g.start_us) / 1e6;
	uint64_t unacked = 0;
	unsigned i;

	if (el <= 0)
		el = 1e-9;
	for (i = 0; i < g.cfg.gateways; i++)
		unacked += g.gws[i].n_used;

	fprintf(stderr,
		"gw-sim: %s after %.1f s: %u gateways x %u devices; frames sent %"
		PRIu64 " (resent %" PRIu64 "), acked %" PRIu64 ", unacked %" PRIu64
		"; readings acked %" PRIu64 " (%.0f/s), rejected %" PRIu64
		"; unavailable %" PRIu64 ", hub errors %" PRIu64 "; connects %"
		PRIu64 ", failures %" PRIu64 ", disconnects %" PRIu64
		"; latency p50 %.2f p99 %.2f max %.2f ms\n",
		g.stop_reason ? g.stop_reason : "stopped", el, g.cfg.gateways,
		g.cfg.devices, g.tot.frames_sent, g.tot.frames_resent,
		g.tot.frames_acked, unacked, g.tot.readings_acked,
		(double)g.tot.readings_acked / el, g.tot.readings_rejected,
		g.tot.unavailable, g.tot.hub_errors, g.tot.connects,
		g.tot.connect_failures, g.tot.disconnects,
		(double)lg_hist_quantile(&g.h_tot, 0.5) / 1000.0,
		(double)lg_hist_quantile(&g.h_tot, 0.99) / 1000.0,
		(double)g.h_tot.max / 1000.0);

	if (g.cfg.json_summary) {
		json_t *rj = json_object(), *ec = json_object(), *o;
		int k;

		for (k = 0; k < RJ_COUNT; k++)
			json_object_set_new(rj, rj_names[k],
					    json_integer((json_int_t)g.tot.rejected[k]));
		for (i = 0; i < g.n_errcodes; i++)
			json_object_set_new(ec, g.errcodes[i].name,
				json_integer((json_int_t)g.errcodes[i].count));
		if (g.errcodes_other)
			json_object_set_new(ec, "(other)",
				json_integer((json_int_t)g.errcodes_other));

#define JI(v) json_integer((json_int_t)(v))
		o = json_pack("{s:s, s:s, s:s, s:f, s:i, s:i, s:f, s:i, s:i}",
			"stop_reason", g.stop_reason ? g.stop_reason : "stopped",
			"mode", g.cfg.idle ? "idle" : g.cfg.rate > 0 ? "open" : "closed",
			"protocol", g.cfg.mqtt ? "mqtt" : "iot-gateway.v1",
			"elapsed_s", el,
			"gateways", (int)g.cfg.gateways,
			"devices_per_gateway", (int)g.cfg.devices,
			"rate", g.cfg.rate,
			"batch", (int)g.cfg.batch,
			"inflight", (int)g.cfg.inflight);
		/* headline numbers first: acks (frames acked) and errors (hub
		 * errors other than unavailable, protocol errors, ack mismatches) */
		json_object_set_new(o, "acks", JI(g.tot.frames_acked));
		json_object_set_new(o, "errors", JI(g.tot.hub_errors +
			g.tot.proto_errors + g.tot.ack_mismatch));
		json_object_set_new(o, "readings_acked", JI(g.tot.readings_acked));
		json_object_set_new(o, "connects", JI(g.tot.connects));
		json_object_set_new(o, "connect_failures", JI(g.tot.connect_failures));
		json_object_set_new(o, "auth_failures", JI(g.tot.auth_failures));
		json_object_set_new(o, "disconnects", JI(g.tot.disconnects));
		json_object_set_new(o, "takeovers", JI(g.tot.takeovers));
		json_object_set_new(o, "ack_timeouts", JI(g.tot.ack_timeouts));
		json_object_set_new(o, "announce_messages", JI(g.tot.announce_msgs));
		json_object_set_new(o, "announce_rejected_devices",
				    JI(g.tot.announce_rejected));
		json_object_set_new(o, "frames_sent", JI(g.tot.frames_sent));
		json_object_set_new(o, "frames_resent", JI(g.tot.frames_resent));
		json_object_set_new(o, "frames_acked", JI(g.tot.frames_acked));
		json_object_set_new(o, "frames_dropped", JI(g.tot.frames_dropped));
		json_object_set_new(o, "frames_unacked_at_end", JI(unacked));
		json_object_set_new(o, "open_loop_ticks_skipped",
				    JI(g.tot.ticks_skipped));
		json_object_set_new(o, "readings_sent", JI(g.tot.readings_sent));
		json_object_set_new(o, "readings_rejected",
				    JI(g.tot.readings_rejected));
		json_object_set_new(o, "readings_bad_generated",
				    JI(g.tot.readings_bad));
		json_object_set_new(o, "rejected_by_code", rj);
		json_object_set_new(o, "unavailable", JI(g.tot.unavailable));
		json_object_set_new(o, "hub_errors", JI(g.tot.hub_errors));
		json_object_set_new(o, "hub_errors_by_code", ec);
		json_object_set_new(o, "protocol_errors", JI(g.tot.proto_errors));
		json_object_set_new(o, "ack_mismatch", JI(g.tot.ack_mismatch));
		json_object_set_new(o, "unexpected_acks", JI(g.tot.unexpected_acks));
		json_object_set_new(o, "duplicate_acks", JI(g.tot.duplicate_acks));
		json_object_set_new(o, "announce_retries", JI(g.tot.announce_retries));
		json_object_set_new(o, "commands", json_pack(
			"{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}",
			"received", (json_int_t)g.tot.cmds_received,
			"acks_sent", (json_int_t)g.tot.cmd_acks_sent,
			"acks_dropped", (json_int_t)g.tot.cmd_acks_dropped,
			"cancels", (json_int_t)g.tot.cancels,
			"ignored", (json_int_t)g.tot.cmds_ignored,
			"rejected", (json_int_t)g.tot.cmds_rejected,
			"failed", (json_int_t)g.tot.cmds_failed,
			"succeeded", (json_int_t)g.tot.cmds_succeeded,
			"canceled", (json_int_t)g.tot.cmds_canceled));
		json_object_set_new(o, "throughput", json_pack(
			"{s:f, s:f, s:f}",
			"frames_sent_per_s", (double)g.tot.frames_sent / el,
			"frames_acked_per_s", (double)g.tot.frames_acked / el,
			"readings_acked_per_s", (double)g.tot.readings_acked / el));
		{
			struct rusage ru;

			if (!getrusage(RUSAGE_SELF, &ru)) {
				json_object_set_new(o, "max_rss_kb", JI(ru.ru_maxrss));
				json_object_set_new(o, "cpu_s", json_real(
					lg_tv_s(ru.ru_utime) +
					lg_tv_s(ru.ru_stime)));
			}
		}
		json_object_set_new(o, "warmup_s", json_real(g.cfg.warmup));
		json_object_set_new(o, "latency_us", json_pack(
			"{s:I, s:I, s:I, s:I, s:I, s:I, s:f}",
			"count", (json_int_t)g.h_tot.count,
			"p50", (json_int_t)lg_hist_quantile(&g.h_tot, 0.50),
			"p90", (json_int_t)lg_hist_quantile(&g.h_tot, 0.90),
			"p99", (json_int_t)lg_hist_quantile(&g.h_tot, 0.99),
			"p99.9", (json_int_t)lg_hist_quantile(&g.h_tot, 0.999),
			"max", (json_int_t)g.h_tot.max,
			"mean", lg_hist_mean(&g.h_tot)));
#undef JI
		json_dumpf(o, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER |
			   JSON_REAL_PRECISION(6));
		fputc('\n', stdout);
		fflush(stdout);
		json_decref(o);
	}
}

/* ------------------------------------------------------------------------ */
/* command line                                                               */

static void
usage(FILE *f)
{
	fprintf(f,
"usage: gw-sim [options]\n"
"Simulates gateways against an iot-hub /v1/gateway endpoint (CONTRACT.md §2).\n"
"\n"
"Connection\n"
"  --url URL            ws:// or wss:// endpoint (default ws://127.0.0.1:8080/v1/gateway)\n"
"  --token JWT          bearer token used by every gateway\n"
"  --token-cmd 'CMD'    run once per gateway at start; {sub} is replaced by the\n"
"                       gateway id; stdout is the token\n"
"  --jwt-secret FILE    mint each gateway's HS256 token in-process with this\n"
"                       secret (the file's bytes less trailing CR/LF, as the hub)\n"
"  --jwt-devices LIST   devices claim of minted tokens: comma-separated patterns,\n"
"                       {sub} is replaced by the gateway id (default *)\n"
"  --ttl S              minted tokens expire S seconds after start (default 3600)\n"
"  --ca FILE            CA bundle to verify the hub (wss)\n"
"  --cert FILE --key FILE  client certificate for mTLS\n"
"  --insecure           do not verify the hub's certificate\n"
"  --source-ips A,B,..  bind connections round-robin to these local addresses\n"
"  --connect-rate C     new connections per second, also reconnects (default 1000)\n"
"  --mqtt               speak MQTT 3.1.1 over WebSocket (subprotocol mqtt, binary\n"
"                       frames) to a broker such as Mosquitto instead: CONNECT\n"
"                       (client id = gateway id, clean session, keepalive 60),\n"
"                       then each frame's JSON as one PUBLISH QoS 1 to\n"
"                       tele/<gateway>; its PUBACK is the ack. No token needed;\n"
"                       no announce, no commands (docs/simulator.md)\n"
"\n"
"Fleet\n"
"  --gateways N         gateways (default 1)\n"
"  --devices M          devices per gateway (default 10)\n"
"  --gateway-prefix P   gateway ids P-0000, P-0001, ... (default gw)\n"
"  --device-type T      device type announced (default thermostat)\n"
"  --labels k=v,k=v     labels announced with every device\n"
"\n"
"Traffic\n"
"  --rate R             readings/s per gateway, open loop; 0 = closed loop (default 0)\n"
"  --batch B            readings per telemetry frame (default 1)\n"
"  --inflight K         unacked frames per gateway (default 1)\n"
"  --duration S         stop after S seconds (default 0 = until SIGINT/SIGTERM)\n"
"  --frames F           stop each gateway after F frames, all acked\n"
"  --ack-timeout S      reconnect when a frame waits S s for its ack (default 30,\n"
"                       0 = wait forever)\n"
"  --bad-ratio X        fraction of readings made invalid (temperature 500)\n"
"  --stamp-field NAME   also put NAME: wall-clock Unix microseconds at generation\n"
"                       in every reading's data (the device type must allow it,\n"
"                       e.g. bench/device-types/bench.json: sent_us)\n"
"  --idle               connect and announce, then send no telemetry\n"
"  --seq-start N        first seq of gateway 0; gateway i starts at N + i*1e9\n"
"                       (default N: Unix time in microseconds, so a restarted\n"
"                       simulator never reuses a seq the hub already stored)\n"
"  --seed N             random seed (default: time and pid)\n"
"  --max-frame BYTES    largest frame sent or accepted (default 65536)\n"
"\n"
"Commands\n"
"  --cmd-ack-delay-ms MS delay before `received` (default 0)\n"
"  --cmd-delay-ms MS    delay before each later step (default 200)\n"
"  --cmd-steps N        firmware_update progress reports 0..100 in N steps\n"
"                       (default 4: 0, 25, 50, 75, 100)\n"
"  --cmd-fail NAMES|P   report these commands failed (comma-separated names),\n"
"                       or any command with probability P (0..1)\n"
"  --cmd-ignore NAMES|P send nothing at all for these commands, or for a\n"
"                       delivery with probability P (0..1)\n"
"  --cmd-reject NAMES   reject these commands as unsupported\n"
"\n"
"Output\n"
"  --stats-interval S   one stats line per S seconds on stderr (default 0 = off)\n"
"  --json-summary       final JSON summary on stdout\n"
"  --warmup S           leave frames sent in the first S s out of the summary's\n"
"                       latency_us (the connect ramp); default 0\n"
"  -v, --verbose        more logs (twice: debug and lws notices)\n"
"  -q, --quiet          errors only\n"
"  -h, --help           this help\n");
}

/* --cmd-fail / --cmd-ignore: a probability 0..1 (a number), else names */
static void
names_or_prob(const char *flag, const char *arg, const char **names, double *p)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(arg, &end);
	if (*arg && !*end && !errno && (isdigit((unsigned char)*arg) || *arg == '.')) {
		if (!(v >= 0 && v <= 1))
			lg_die_flag("%s: a probability is from 0 to 1, got '%s'", flag, arg);
		*p = v;
		*names = NULL;
		return;
	}
	if (!*arg)
		lg_die_flag("%s: empty list", flag);
	*names = arg;
	*p = 0;
}

/* ws://host[:port][/path] or wss://...; [v6] literals allowed */
static void
parse_url(struct sim_cfg *c)
{
	struct lg_endpoint *ep = &c->ep;
	const char *u = c->url, *h, *e, *pe;
	int port;

	if (!strncmp(u, "ws://", 5)) {
		c->tls = 0;
		h = u + 5;
		port = 80;
	} else if (!strncmp(u, "wss://", 6)) {
		c->tls = 1;
		h = u + 6;
		port = 443;
	} else
		lg_die_flag("--url: must start with ws:// or wss://, got '%s'", u);

	pe = h + strcspn(h, "/?#");
	ep->host = lg_url_host(u, h, pe, &e);
	if (!*ep->host)
		lg_die_flag("--url: no host in '%s'", u);
	if (*e == ':') {
		char *ps = strndup(e + 1, (size_t)(pe - e - 1));

		if (!ps)
			abort();
		port = (int)lg_parse_u64("--url port", ps, 1, 65535);
		free(ps);
	} else if (e != pe)
		lg_die_flag("--url: bad host part in '%s'", u);
	ep->port = port;
	if (*pe == '/') {
		ep->path = strndup(pe, strcspn(pe, "#"));
		if (!ep->path)
			abort();
	} else if (!*pe)
		ep->path = lg_xstrdup("/");
	else
		lg_die_flag("--url: bad path in '%s'", u);
	/* no port in Host: when it is the scheme's default */
	ep->host_hdr = lg_host_header(ep->host, port == (c->tls ? 443 : 80) ? 0 :
				      port);
}

/* "k=v,k=v" -> compact JSON object text, or NULL for none */
static char *
parse_labels(const char *s)
{
	json_t *o = json_object();
	char *dup = lg_xstrdup(s), *save = NULL, *tok, *out;

	for (tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');

		if (!eq || eq == tok)
			lg_die_flag("--labels: expected k=v[,k=v...], got '%s'", s);
		*eq = '\0';
		if (json_object_set_new(o, tok, json_string(eq + 1)))
			lg_die_flag("--labels: not valid UTF-8: '%s'", s);
	}
	free(dup);
	out = json_object_size(o) ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER)
				  : NULL;
	json_decref(o);
	return out;
}

static void
parse_args(int argc, char **argv)
{
	enum {
		O_URL = 256, O_TOKEN, O_TOKEN_CMD, O_CA, O_CERT, O_KEY, O_INSECURE,
		O_GATEWAYS, O_DEVICES, O_PREFIX, O_DTYPE, O_LABELS, O_RATE, O_BATCH,
		O_INFLIGHT, O_DURATION, O_FRAMES, O_BAD, O_CRATE, O_STATS, O_JSON,
		O_IDLE, O_CMD_DELAY, O_CMD_FAIL, O_CMD_IGNORE, O_CMD_REJECT, O_SRC,
		O_CMD_ACK_DELAY, O_CMD_STEPS,
		O_MAXFRAME, O_SEQSTART, O_SEED, O_ACKTO, O_JWT_SECRET, O_JWT_DEVICES,
		O_TTL, O_WARMUP, O_STAMP, O_MQTT,
	};
	static const struct option opts[] = {
		{ "url", required_argument, NULL, O_URL },
		{ "token", required_argument, NULL, O_TOKEN },
		{ "token-cmd", required_argument, NULL, O_TOKEN_CMD },
		{ "jwt-secret", required_argument, NULL, O_JWT_SECRET },
		{ "jwt-devices", required_argument, NULL, O_JWT_DEVICES },
		{ "ttl", required_argument, NULL, O_TTL },
		{ "warmup", required_argument, NULL, O_WARMUP },
		{ "stamp-field", required_argument, NULL, O_STAMP },
		{ "mqtt", no_argument, NULL, O_MQTT },
		{ "ca", required_argument, NULL, O_CA },
		{ "cert", required_argument, NULL, O_CERT },
		{ "key", required_argument, NULL, O_KEY },
		{ "insecure", no_argument, NULL, O_INSECURE },
		{ "gateways", required_argument, NULL, O_GATEWAYS },
		{ "devices", required_argument, NULL, O_DEVICES },
		{ "gateway-prefix", required_argument, NULL, O_PREFIX },
		{ "device-type", required_argument, NULL, O_DTYPE },
		{ "labels", required_argument, NULL, O_LABELS },
		{ "rate", required_argument, NULL, O_RATE },
		{ "batch", required_argument, NULL, O_BATCH },
		{ "inflight", required_argument, NULL, O_INFLIGHT },
		{ "duration", required_argument, NULL, O_DURATION },
		{ "frames", required_argument, NULL, O_FRAMES },
		{ "bad-ratio", required_argument, NULL, O_BAD },
		{ "connect-rate", required_argument, NULL, O_CRATE },
		{ "stats-interval", required_argument, NULL, O_STATS },
		{ "json-summary", no_argument, NULL, O_JSON },
		{ "idle", no_argument, NULL, O_IDLE },
		{ "cmd-delay-ms", required_argument, NULL, O_CMD_DELAY },
		{ "cmd-ack-delay-ms", required_argument, NULL, O_CMD_ACK_DELAY },
		{ "cmd-steps", required_argument, NULL, O_CMD_STEPS },
		{ "cmd-fail", required_argument, NULL, O_CMD_FAIL },
		{ "cmd-ignore", required_argument, NULL, O_CMD_IGNORE },
		{ "cmd-reject", required_argument, NULL, O_CMD_REJECT },
		{ "source-ips", required_argument, NULL, O_SRC },
		{ "max-frame", required_argument, NULL, O_MAXFRAME },
		{ "seq-start", required_argument, NULL, O_SEQSTART },
		{ "seed", required_argument, NULL, O_SEED },
		{ "ack-timeout", required_argument, NULL, O_ACKTO },
		{ "verbose", no_argument, NULL, 'v' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct sim_cfg *c = &g.cfg;
	const char *labels = NULL, *src = NULL;
	int o;

	c->url = "ws://127.0.0.1:8080/v1/gateway";
	c->gateways = 1;
	c->devices = 10;
	c->gw_prefix = "gw";
	c->device_type = "thermostat";
	c->batch = 1;
	c->inflight = 1;
	c->connect_rate = 1000;
	c->cmd_delay_ms = 200;
	c->cmd_steps = 4;
	c->max_frame = 65536;
	c->ack_timeout = 30;

	opterr = 0;
	while ((o = getopt_long(argc, argv, ":vqh", opts, NULL)) != -1) {
		switch (o) {
		case O_URL: c->url = optarg; break;
		case O_TOKEN: c->token = optarg; break;
		case O_TOKEN_CMD: c->token_cmd = optarg; break;
		case O_JWT_SECRET: c->jwt_secret = optarg; break;
		case O_JWT_DEVICES: c->jwt_devices = optarg; break;
		case O_WARMUP:
			c->warmup = lg_parse_num("--warmup", optarg, 0, 1e6);
			break;
		case O_STAMP: c->stamp_field = optarg; break;
		case O_MQTT: c->mqtt = 1; break;
		case O_TTL:
			c->ttl = lg_parse_u64("--ttl", optarg, 1, 10ull * 366 * 24 * 3600);
			break;
		case O_CA: c->ca = optarg; break;
		case O_CERT: c->cert = optarg; break;
		case O_KEY: c->key = optarg; break;
		case O_INSECURE: c->insecure = 1; break;
		case O_GATEWAYS:
			c->gateways = (unsigned)lg_parse_u64("--gateways", optarg, 1,
							     1000000);
			break;
		case O_DEVICES:
			c->devices = (unsigned)lg_parse_u64("--devices", optarg, 0,
							    1000000);
			break;
		case O_PREFIX: c->gw_prefix = optarg; break;
		case O_DTYPE: c->device_type = optarg; break;
		case O_LABELS: labels = optarg; break;
		case O_RATE:
			c->rate = lg_parse_num("--rate", optarg, 0, 1e7);
			break;
		case O_BATCH:
			c->batch = (unsigned)lg_parse_u64("--batch", optarg, 1, 10000);
			break;
		case O_INFLIGHT:
			c->inflight = (unsigned)lg_parse_u64("--inflight", optarg, 1,
							     100000);
			break;
		case O_DURATION:
			c->duration = lg_parse_num("--duration", optarg, 0, 1e7);
			break;
		case O_FRAMES:
			c->frames = lg_parse_u64("--frames", optarg, 0, UINT64_MAX / 2);
			break;
		case O_BAD:
			c->bad_ratio = lg_parse_num("--bad-ratio", optarg, 0, 1);
			break;
		case O_CRATE:
			c->connect_rate = lg_parse_num("--connect-rate", optarg,
						       0.01, 1e6);
			break;
		case O_STATS:
			c->stats_interval = lg_parse_stats_interval(optarg);
			break;
		case O_JSON: c->json_summary = 1; break;
		case O_IDLE: c->idle = 1; break;
		case O_CMD_DELAY:
			c->cmd_delay_ms = (unsigned)lg_parse_u64(
				"--cmd-delay-ms", optarg, 0, 3600000);
			break;
		case O_CMD_ACK_DELAY:
			c->cmd_ack_delay_ms = (unsigned)lg_parse_u64(
				"--cmd-ack-delay-ms", optarg, 0, 3600000);
			break;
		case O_CMD_STEPS:
			c->cmd_steps = (unsigned)lg_parse_u64("--cmd-steps", optarg, 1, 100);
			break;
		case O_CMD_FAIL:
			names_or_prob("--cmd-fail", optarg, &c->cmd_fail, &c->cmd_fail_p);
			break;
		case O_CMD_IGNORE:
			names_or_prob("--cmd-ignore", optarg, &c->cmd_ignore,
				      &c->cmd_ignore_p);
			break;
		case O_CMD_REJECT:
			if (!*optarg)
				lg_die_flag("--cmd-reject: empty list");
			c->cmd_reject = optarg;
			break;
		case O_SRC: src = optarg; break;
		case O_MAXFRAME:
			c->max_frame = (size_t)lg_parse_u64("--max-frame", optarg, 1024,
							    16u << 20);
			break;
		case O_SEQSTART:
			c->seq_start = lg_parse_u64("--seq-start", optarg, 0,
						    (1ull << 52));
			c->seq_start_set = 1;
			break;
		case O_SEED:
			c->seed = lg_parse_u64("--seed", optarg, 0, UINT64_MAX);
			break;
		case O_ACKTO:
			c->ack_timeout = lg_parse_num("--ack-timeout", optarg, 0,
						      86400);
			break;
		default:
			lg_common_option(o, argv, usage);
		}
	}
	if (optind < argc)
		lg_die_flag("unexpected argument '%s'", argv[optind]);

	parse_url(c);
	if (c->mqtt ? !!c->token + !!c->token_cmd + !!c->jwt_secret > 1 :
	    !!c->token + !!c->token_cmd + !!c->jwt_secret != 1)
		lg_die_flag("give exactly one of --token, --token-cmd and --jwt-secret%s",
			    c->mqtt ? " (or none with --mqtt)" : "");
	if (c->mqtt && c->inflight > SIM_MQTT_PIDS)
		lg_die_flag("--inflight: at most %u with --mqtt (16-bit packet ids)",
			    SIM_MQTT_PIDS);
	if ((c->jwt_devices || c->ttl) && !c->jwt_secret)
		lg_die_flag("--jwt-devices and --ttl need --jwt-secret");
	if (!c->ttl)
		c->ttl = 3600;
	if (c->token && c->gateways > 1 && !c->mqtt)
		LOG(LOG_WARN, "--token is shared by %u gateways: the hub knows a "
		    "gateway by its token's sub, so they will take each other over "
		    "(close 4001); use --token-cmd to mint one token per gateway",
		    c->gateways);
	if (c->token_cmd && !strstr(c->token_cmd, "{sub}"))
		LOG(LOG_WARN, "--token-cmd has no {sub}: every gateway gets the "
		    "same kind of token");
	if (!c->cert != !c->key)
		lg_die_flag("--cert and --key go together");
	if ((c->ca || c->cert || c->insecure) && !c->tls)
		lg_die_flag("--ca, --cert, --key and --insecure need a wss:// --url");
	if (!id_ok(c->gw_prefix, SIM_ID_MAX - 24))
		lg_die_flag("--gateway-prefix: must match [A-Za-z0-9._:-]{1,104}, "
			    "got '%s'", c->gw_prefix);
	if (c->stamp_field) {
		const char *q = c->stamp_field;

		while (*q && (isalnum((unsigned char)*q) || *q == '_'))
			q++;
		if (!*c->stamp_field || *q || q - c->stamp_field > 64)
			lg_die_flag("--stamp-field: must match [A-Za-z0-9_]{1,64}, "
				    "got '%s'", c->stamp_field);
		if (!strcmp(c->stamp_field, "temperature") ||
		    !strcmp(c->stamp_field, "humidity"))
			lg_die_flag("--stamp-field: '%s' is already in every reading",
				    c->stamp_field);
	}
	if (!*c->device_type || strlen(c->device_type) > SIM_ID_MAX)
		lg_die_flag("--device-type: 1 to %u characters", SIM_ID_MAX);
	if (c->rate > 0 && c->rate / c->batch > 1e6)
		lg_die_flag("--rate/--batch: more than 1e6 frames/s per gateway");
	if (c->idle && (c->rate > 0 || c->frames))
		lg_die_flag("--idle sends no telemetry: drop --rate/--frames");
	if (labels) {
		g.labels_json = parse_labels(labels);
		if (g.labels_json && strlen(g.labels_json) > 256)
			lg_die_flag("--labels: at most 256 bytes of JSON");
	}
	{
		json_t *js = json_string(c->device_type);

		if (!js)
			lg_die_flag("--device-type: not valid UTF-8");
		g.dev_type_json = json_dumps(js, JSON_ENCODE_ANY);
		json_decref(js);
	}
	if (frame_bound() > c->max_frame)
		lg_die_flag("--batch %u can make frames of %zu bytes, over --max-frame "
			    "%zu", c->batch, frame_bound(), c->max_frame);
	if (src) {
		char *dup = lg_xstrdup(src), *save = NULL, *tok;

		for (tok = strtok_r(dup, ",", &save); tok;
		     tok = strtok_r(NULL, ",", &save)) {
			struct in_addr a4;
			struct in6_addr a6;

			if (inet_pton(AF_INET, tok, &a4) != 1 &&
			    inet_pton(AF_INET6, tok, &a6) != 1)
				lg_die_flag("--source-ips: '%s' is not an IP address",
					    tok);
			c->src_ips = lg_xrealloc(c->src_ips, (c->n_src_ips + 1) *
						 sizeof(char *));
			c->src_ips[c->n_src_ips++] = lg_xstrdup(tok);
		}
		free(dup);
		if (!c->n_src_ips)
			lg_die_flag("--source-ips: empty list");
	}
}

/* ------------------------------------------------------------------------ */
/* tokens                                                                     */

static int
token_ok(const char *t)
{
	if (!*t)
		return 0;
	for (; *t; t++)
		if (*t <= ' ' || *t == 0x7f)
			return 0;
	return 1;
}

static char *
make_auth(const char *token)
{
	size_t n = strlen(token) + 8;
	char *a = lg_xmalloc(n);

	snprintf(a, n, "Bearer %s", token);
	return a;
}

/* start --token-cmd for one gateway; returns the pipe or NULL */
static FILE *
token_cmd_start(const char *tmpl, const char *sub)
{
	size_t cap = strlen(tmpl) + 1;
	const char *p;
	char *cmd;
	FILE *f;

	for (p = tmpl; (p = strstr(p, "{sub}")); p += 5)
		cap += strlen(sub);
	cmd = lg_xmalloc(cap);
	cmd[0] = '\0';
	for (p = tmpl; *p;) {
		if (!strncmp(p, "{sub}", 5)) {
			strcat(cmd, sub);   /* sub matches [A-Za-z0-9._:-]: shell-safe */
			p += 5;
		} else {
			size_t l = strlen(cmd);

			cmd[l] = *p++;
			cmd[l + 1] = '\0';
		}
	}
	f = popen(cmd, "r");
	free(cmd);
	if (!f)
		fprintf(stderr, "gw-sim: --token-cmd: cannot run: %s\n",
			strerror(errno));
	return f;
}

/* read and reap a --token-cmd; returns "Bearer <token>" or NULL */
static char *
token_cmd_finish(FILE *f, const char *sub)
{
	size_t n = 0, r;
	const char *p;
	char *out;
	int st;

	out = lg_xmalloc(SIM_TOKEN_MAX + 1);
	while (n < SIM_TOKEN_MAX && (r = fread(out + n, 1, SIM_TOKEN_MAX - n, f)))
		n += r;
	while (fgetc(f) != EOF)     /* drain so the child never blocks */
		n = SIM_TOKEN_MAX + 1;
	st = pclose(f);
	if (n > SIM_TOKEN_MAX) {
		fprintf(stderr, "gw-sim: --token-cmd for %s: output over %u bytes\n",
			sub, SIM_TOKEN_MAX);
		goto fail;
	}
	if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st)) {
		fprintf(stderr, "gw-sim: --token-cmd for %s: command failed "
			"(status %d)\n", sub, st == -1 ? -1 :
			WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
		goto fail;
	}
	out[n] = '\0';
	while (n && isspace((unsigned char)out[n - 1]))
		out[--n] = '\0';
	p = out;
	while (isspace((unsigned char)*p))
		p++;
	if (!token_ok(p)) {
		fprintf(stderr, "gw-sim: --token-cmd for %s: output is not one "
			"token (empty, or contains spaces/control characters)\n",
			sub);
		goto fail;
	}
	{
		char *a = make_auth(p);

		free(out);
		return a;
	}
fail:
	free(out);
	return NULL;
}

/*
 * --jwt-secret: HS256 tokens minted in-process, a few microseconds each
 * instead of a process spawn per gateway. Header {"alg":"HS256","typ":"JWT"},
 * claims sub, iat, exp = iat + --ttl, devices (--jwt-devices, default ["*"]):
 * what `iot-token jwt --alg HS256` prints.

 */

static void
b64url(const unsigned char *in, size_t n, char *out)
{
	static const char a[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	size_t i;

	for (i = 0; i + 2 < n; i += 3) {
		*out++ = a[in[i] >> 2];
		*out++ = a[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
		*out++ = a[((in[i + 1] & 15) << 2) | (in[i + 2] >> 6)];
		*out++ = a[in[i + 2] & 63];
	}
	if (n - i == 1) {
		*out++ = a[in[i] >> 2];
		*out++ = a[(in[i] & 3) << 4];
	} else if (n - i == 2) {
		*out++ = a[in[i] >> 2];
		*out++ = a[((in[i] & 3) << 4) | (in[i + 1] >> 4)];
		*out++ = a[(in[i + 1] & 15) << 2];
	}
	*out = '\0';
}

/* the secret: the file's bytes less trailing CR/LF (the hub's rule) */
static unsigned char *
read_secret(const char *path, size_t *len)
{
	unsigned char *buf = lg_xmalloc(64 * 1024 + 1);
	FILE *f = fopen(path, "rb");
	size_t n;

	if (!f) {
		fprintf(stderr, "gw-sim: --jwt-secret %s: %s\n", path, strerror(errno));
		exit(1);
	}
	n = fread(buf, 1, 64 * 1024 + 1, f);
	fclose(f);
	if (n > 64 * 1024) {
		fprintf(stderr, "gw-sim: --jwt-secret %s: over 64 KiB\n", path);
		exit(1);
	}
	while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		n--;
	if (n < 16) {
		fprintf(stderr, "gw-sim: --jwt-secret %s: HS256 secret is %zu bytes; "
			"the hub requires at least 16\n", path, n);
		exit(1);
	}
	*len = n;
	return buf;
}

/* the devices claim for gateway sub: --jwt-devices split on ',' */
static json_t *
devices_claim(const char *list, const char *sub)
{
	json_t *a = json_array();
	const char *p = list ? list : "*";

	for (;;) {
		const char *e = strchr(p, ',');
		size_t n = e ? (size_t)(e - p) : strlen(p);
		char pat[2 * SIM_ID_MAX + 8];
		size_t k = 0;

		for (size_t i = 0; i < n && k < sizeof(pat) - 1;) {
			if (n - i >= 5 && !memcmp(p + i, "{sub}", 5)) {
				size_t l = strlen(sub);

				if (l > sizeof(pat) - 1 - k)
					l = sizeof(pat) - 1 - k;
				memcpy(pat + k, sub, l);
				k += l;
				i += 5;
			} else {
				pat[k++] = p[i++];
			}
		}
		pat[k] = '\0';
		if (k)
			json_array_append_new(a, json_string(pat));
		if (!e)
			break;
		p = e + 1;
	}
	return a;
}

static int
mint_local(void)
{
	static const char hdr[] = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";
	int64_t t0 = lg_mono_us(), iat = (int64_t)time(NULL), exp = iat + (int64_t)g.cfg.ttl;
	size_t klen;
	unsigned char *key;
	unsigned i;

	key = read_secret(g.cfg.jwt_secret, &klen);
	for (i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];
		json_t *claims = json_pack("{s:s, s:I, s:I, s:o}", "sub", gw->id,
					   "iat", (json_int_t)iat, "exp", (json_int_t)exp,
					   "devices",
					   devices_claim(g.cfg.jwt_devices, gw->id));
		char *body = claims ? json_dumps(claims, JSON_COMPACT) : NULL;
		unsigned char mac[EVP_MAX_MD_SIZE];
		unsigned maclen = 0;
		size_t blen, n;
		char *a;

		json_decref(claims);
		if (!body) {
			fprintf(stderr, "gw-sim: out of memory minting tokens\n");
			abort();
		}
		blen = strlen(body);
		/* "Bearer " hdr "." body64 "." sig64 */
		a = lg_xmalloc(7 + sizeof(hdr) + 1 + (blen + 2) / 3 * 4 + 1 + 44 + 1);
		n = (size_t)sprintf(a, "Bearer %s.", hdr);
		b64url((const unsigned char *)body, blen, a + n);
		free(body);
		n += strlen(a + n);
		if (!HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)a + 7,
			  n - 7, mac, &maclen)) {
			fprintf(stderr, "gw-sim: --jwt-secret: HMAC failed\n");
			free(a);
			free(key);
			return -1;
		}
		a[n++] = '.';
		b64url(mac, maclen, a + n);
		gw->auth = a;
		gw->auth_len = strlen(a);
		gw->auth_owned = 1;
	}
	free(key);
	LOG(LOG_INFO, "tokens: %u minted in %.1f ms", g.cfg.gateways,
	    (double)(lg_mono_us() - t0) / 1e3);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* setup / teardown                                                           */

/*
 * --token-cmd for every gateway, SIM_TOKEN_JOBS at a time: a token is far
 * smaller than a pipe buffer, so the children never block on their output and
 * are read in order. Process creation still dominates on slow hosts.
 */
#define SIM_TOKEN_JOBS 16
static int
mint_tokens(void)
{
	FILE *jobs[SIM_TOKEN_JOBS];
	unsigned b, k, n, i;
	int rc = 0;

	for (b = 0; b < g.cfg.gateways; b += n) {
		n = g.cfg.gateways - b < SIM_TOKEN_JOBS ? g.cfg.gateways - b
							: SIM_TOKEN_JOBS;
		for (k = 0; k < n; k++)
			jobs[k] = token_cmd_start(g.cfg.token_cmd, g.gws[b + k].id);
		for (k = 0; k < n; k++) {
			struct gw *gw = &g.gws[b + k];
			char *a = jobs[k] ? token_cmd_finish(jobs[k], gw->id) : NULL;

			if (!a) {
				rc = -1;
				continue;
			}
			gw->auth = a;
			gw->auth_len = strlen(a);
			gw->auth_owned = 1;
		}
		if (rc)
			return rc;
		i = b + n;
		if (g.cfg.gateways >= 1000 && (i % 1000 < n || i == g.cfg.gateways))
			LOG(LOG_INFO, "tokens: %u/%u", i, g.cfg.gateways);
	}
	return 0;
}

static int
setup_gateways(void)
{
	struct sim_cfg *c = &g.cfg;
	uint64_t seq0;
	unsigned i, d;
	int rc = 0;

	g.gws = lg_xcalloc(c->gateways, sizeof(*g.gws));
	g.temps = lg_xcalloc((size_t)c->gateways * c->devices + 1, sizeof(float));
	g.hums = lg_xcalloc((size_t)c->gateways * c->devices + 1, sizeof(float));
	g.connq = lg_xcalloc(c->gateways, sizeof(*g.connq));
	g.heap = lg_xcalloc(c->gateways, sizeof(*g.heap));
	seq0 = c->seq_start_set ? c->seq_start : (uint64_t)lg_wall_us();
	if (c->token)
		g.shared_auth = make_auth(c->token);

	for (i = 0; i < c->gateways; i++) {
		struct gw *gw = &g.gws[i];

		gw->idx = i;
		gw->heap_pos = -1;
		snprintf(gw->id, sizeof(gw->id), "%s-%04u", c->gw_prefix, i);
		gw->win = lg_xcalloc(c->inflight, sizeof(*gw->win));
		/* disjoint seq ranges: gateways that share a sub (one --token)
		 * must not have their frames deduplicated against each other */
		gw->next_seq = gw->base_seq = gw->send_cursor =
			seq0 + (uint64_t)i * SIM_SEQ_STRIDE;
		gw->temp = g.temps + (size_t)i * c->devices;
		gw->hum = g.hums + (size_t)i * c->devices;
		gw->dev_cursor = c->devices ? (unsigned)(rng_next() % c->devices)
					    : 0;
		for (d = 0; d < c->devices; d++) {
			gw->temp[d] = (float)(18.0 + 6.0 * rng_unit());
			gw->hum[d] = (float)(35.0 + 20.0 * rng_unit());
		}
		if (c->token) {
			gw->auth = g.shared_auth;
			gw->auth_len = strlen(gw->auth);
		}
	}
	if (c->token_cmd)
		rc = mint_tokens();
	else if (c->jwt_secret)
		rc = mint_local();
	return rc;
}

static void
free_all(void)
{
	unsigned i, k;

	for (i = 0; g.gws && i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];

		for (k = 0; gw->win && k < g.cfg.inflight; k++)
			free(gw->win[k].buf);
		free(gw->win);
		free(gw->rx.buf);
		gw_ctrl_clear(gw);
		while (gw->cmds) {
			struct sim_cmd *c = gw->cmds;

			gw->cmds = c->next;
			free(c->id);
			free(c->name);
			free(c->version);
			free(c);
		}
		if (gw->auth_owned)
			free((char *)gw->auth);
	}
	free(g.gws);
	free(g.temps);
	free(g.hums);
	free(g.connq);
	free(g.heap);
	free(g.tx);
	free(g.shared_auth);
	free(g.dev_type_json);
	free(g.labels_json);
	for (i = 0; i < g.cfg.n_src_ips; i++)
		free(g.cfg.src_ips[i]);
	free(g.cfg.src_ips);
	lg_endpoint_free(&g.cfg.ep);
}

int
main(int argc, char **argv)
{
	struct lws_context_creation_info info;
	unsigned i;

	lg_init("gw-sim");
	parse_args(argc, argv);
	g.rng = g.cfg.seed ? g.cfg.seed :
		((uint64_t)lg_wall_us() ^ ((uint64_t)getpid() << 32));
	if (!g.rng)
		g.rng = 0x9e3779b97f4a7c15ull;
	if (lg_raise_nofile("--gateways", g.cfg.gateways))
		exit(2);
	signal(SIGPIPE, SIG_IGN);

	if (setup_gateways()) {
		free_all();
		return 1;
	}
	if (g.cfg.rate > 0)
		g.interval_ns = (int64_t)llround((double)g.cfg.batch * 1e9 /
						 g.cfg.rate);
	if (g.cfg.rate > 0 && g.interval_ns < 1)
		g.interval_ns = 1;

	lws_set_log_level(lg_lws_log_levels(), lws_log_emit);

	lg_context_info(&info, sim_protocols);
	if (g.cfg.tls)
		info.options |= LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT;
	info.client_ssl_ca_filepath = g.cfg.ca;
	info.client_ssl_cert_filepath = g.cfg.cert;
	info.client_ssl_private_key_filepath = g.cfg.key;

	g.ctx = lws_create_context(&info);
	if (!g.ctx) {
		fprintf(stderr, "gw-sim: cannot create the lws context (libev "
			"plugin missing, or a bad --ca/--cert/--key?)\n");
		free_all();
		return 1;
	}

	lg_signals_install(g.ctx);

	LOG(LOG_INFO, "%u gateway(s) x %u device(s) -> %s (%s loop%s)",
	    g.cfg.gateways, g.cfg.devices, g.cfg.url,
	    g.cfg.idle ? "idle" : g.cfg.rate > 0 ? "open" : "closed",
	    g.cfg.n_src_ips ? ", bound source addresses" : "");

	g.start_us = g.last_stats_us = lg_mono_us();
	lg_bucket_init(&g.conn_bucket, g.cfg.connect_rate, g.start_us);
	for (i = 0; i < g.cfg.gateways; i++)
		gw_enqueue_connect(&g.gws[i]);
	if (g.cfg.stats_interval > 0)
		lg_stats_start(g.ctx, g.cfg.stats_interval, print_stats_line);
	if (g.cfg.duration > 0)
		lws_sul_schedule(g.ctx, 0, &g.sul_duration, duration_cb,
				 (lws_usec_t)(g.cfg.duration * 1e6));
	if (g.cfg.ack_timeout > 0)
		lws_sul_schedule(g.ctx, 0, &g.sul_watchdog, watchdog_cb,
				 LWS_USEC_PER_SEC);
	if (g.cfg.mqtt)
		lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
				 SIM_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
	lg_heartbeat_start(g.ctx);
	lg_run(g.ctx, &g.destroy_started);
	g.ctx = NULL;

	if (g.cfg.stats_interval > 0)
		print_stats_line(lg_mono_us());
	print_summary();
	free_all();
	return 0;
}
