/*
 * gw-sim: the gateway simulator for iot-hub (docs/simulator.md). It opens N
 * gateway connections to /v1/gateway (subprotocol iot-gateway.v1), announces M
 * devices on each, then sends telemetry frames open loop (--rate) or closed
 * loop, keeps every unacked frame in a bounded per-gateway window, resends
 * unacked frames with their original seq after a reconnect or an `unavailable`
 * error, answers hub commands, and measures frame->ack latency in a
 * log-bucketed histogram. --mqtt drives an MQTT broker over WebSocket the same
 * way. One process, one thread, one client context (client.h, libev backend)
 * for all connections.
 *
 * Loop rules: one write per writeable turn; every queue is bounded; all timers
 * are lws_sul on the client context; a connection closes from its writeable
 * turn (hc_close()), never from a receive. iface (--source-ips) is bound
 * before connect() and may be an IPv4 literal; lws then forces that
 * connection to IPv4.
 */

#define _GNU_SOURCE
#include "tools/loadgen.h"

#include <iothub/gateway.h>
#include <jansson.h>

#include <jwt.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
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
/* configuration                                                              */

struct sim_cfg {
	char *url;
	struct hc_url u;          /* from url */
	char *ca, *cert, *key;
	int insecure;

	char *token;
	char *token_cmd;
	char *jwt_secret;         /* HS256 secret file: gw-sim mints the tokens */
	char *jwt_devices;        /* comma-separated patterns, {sub} expanded */
	uint64_t ttl;             /* s, exp = now + ttl */

	unsigned gateways;
	unsigned devices;
	char *gw_prefix;
	char *device_type;
	char *labels;

	double rate;         /* readings/s per gateway, 0 = closed loop */
	unsigned batch;
	unsigned inflight;
	double duration;
	uint64_t frames;
	double bad_ratio;
	double connect_rate;
	unsigned max_connecting;     /* 0: no limit */
	double stats_interval;
	double ack_timeout;  /* s; 0 = wait for acks forever */
	double warmup;       /* s; frames sent earlier stay out of latency_us */
	char *stamp_field;   /* data field set to wall-clock µs at generation */
	/* --truth: an anomaly test set (docs/simulator.md "Anomaly test sets") */
	char *truth;
	double noise_sigma, spikes, spike_sigma, drifts, drift_slope, stuck;
	unsigned drift_len, stuck_len, ts_step_ms, clean_first;
	double truth_ago_ms;
	int json_summary;
	int idle;
	int mqtt;            /* --mqtt: MQTT 3.1.1 over WebSocket (Mosquitto) */
	char *sdk;           /* --sdk DIR: each gateway is a libiothub-gw gateway */

	unsigned cmd_delay_ms;       /* before each step after `received` */
	unsigned cmd_ack_delay_ms;   /* before `received` */
	unsigned cmd_steps;          /* firmware_update progress steps */
	char *cmd_fail, *cmd_ignore, *cmd_reject;  /* name lists */
	double cmd_fail_p, cmd_ignore_p;  /* or probabilities */

	char *src;                   /* --source-ips, split into src_ips */
	char **src_ips;
	unsigned n_src_ips;

	uint64_t max_frame;
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
	int auth_owned;

	struct hc_conn *conn;
	enum gw_state state;
	unsigned backoff_attempt;
	int killed;               /* hc_close()d: closes at its next writeable */
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

	/* --mqtt: the unfinished start of a packet */
	hub_buf mqtt_rx;

	/* control messages (command acks), bounded */
	struct ctrl_msg *cq_head, *cq_tail;
	unsigned cq_len;
	struct sim_cmd *cmds;
	unsigned n_cmds;

	float *temp, *hum;     /* per-device random walk */
	struct inj *inj;       /* per-device injection state (--truth) */
	uint8_t in_connq;
	uint8_t mqtt_ping;     /* --mqtt: a PINGREQ is owed */
	uint8_t streaming;     /* a frame was acked on this connection */
};

/* ------------------------------------------------------------------------ */
/* counters                                                                   */

enum { RJ_INVALID, RJ_UNKNOWN_DEVICE, RJ_UNAUTHORIZED_DEVICE, RJ_RATE_LIMITED,
       RJ_CLOCK_SKEW, RJ_OTHER, RJ_COUNT };
static const char *const rj_names[RJ_COUNT] = {
	"invalid", "unknown_device", "unauthorized_device", "rate_limited",
	"clock_skew", "other"
};

/* the counters: field, key in the JSON summary (in its order) */
#define SIM_COUNTERS(X)                                                       \
	X(readings_acked, "readings_acked")                                   \
	X(connects, "connects")                                               \
	X(connect_failures, "connect_failures")                               \
	X(auth_failures, "auth_failures")                                     \
	X(disconnects, "disconnects")                                         \
	X(takeovers, "takeovers")                                             \
	X(ack_timeouts, "ack_timeouts")                                       \
	X(announce_msgs, "announce_messages")                                 \
	X(announce_rejected, "announce_rejected_devices")                     \
	X(frames_sent, "frames_sent")                                         \
	X(frames_resent, "frames_resent")                                     \
	X(frames_acked, "frames_acked")                                       \
	X(frames_dropped, "frames_dropped")                                   \
	X(ticks_skipped, "open_loop_ticks_skipped")                           \
	X(readings_sent, "readings_sent")                                     \
	X(readings_rejected, "readings_rejected")                             \
	X(readings_bad, "readings_bad_generated")                             \
	X(unavailable, "unavailable")                                         \
	X(hub_errors, "hub_errors")                                           \
	X(proto_errors, "protocol_errors")                                    \
	X(ack_mismatch, "ack_mismatch")                                       \
	X(unexpected_acks, "unexpected_acks")                                 \
	X(duplicate_acks, "duplicate_acks")                                   \
	X(announce_retries, "announce_retries")
/* the "commands" object of the summary */
#define SIM_CMD_COUNTERS(X)                                                   \
	X(cmds_received, "received")                                          \
	X(cmd_acks_sent, "acks_sent")                                         \
	X(cmd_acks_dropped, "acks_dropped")                                   \
	X(cancels, "cancels")                                                 \
	X(cmds_ignored, "ignored")                                            \
	X(cmds_rejected, "rejected")                                          \
	X(cmds_failed, "failed")                                              \
	X(cmds_succeeded, "succeeded")                                        \
	X(cmds_canceled, "canceled")

struct counters {
#define X(f, k) uint64_t f;
	SIM_COUNTERS(X)
	SIM_CMD_COUNTERS(X)
#undef X
	uint64_t rejected[RJ_COUNT];
};


/* ------------------------------------------------------------------------ */
/* global state (one simulator per process)                                   */

static struct {
	struct sim_cfg cfg;
	struct hc_ctx *x;
	struct lws_context *ctx;   /* x's, for timers */
	struct gw *gws;
	float *temps, *hums;
	struct inj *injs;
	FILE *truth;
	int64_t truth_ts0;
	char *shared_auth;
	char *dev_type_json;
	char *labels_json;

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

	lws_sorted_usec_list_t sul_duration, sul_destroy, sul_drain, sul_watchdog,
			       sul_mqtt_ping;

	int stopping;        /* no new frames; drain the windows */
	int closing;         /* close everything now */
	int destroy_started;
	const char *stop_reason;

	unsigned n_live, n_connected, n_ready, n_done;
	unsigned n_streaming;   /* connections with a frame acked */

	struct counters tot, iv;
	struct lg_codes errcodes;   /* hub errors by code */
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

static uint64_t rng_next(void)
{
	g.rng ^= g.rng >> 12;
	g.rng ^= g.rng << 25;
	g.rng ^= g.rng >> 27;
	return g.rng * 2685821657736338717ull;
}

static double rng_unit(void)
{
	return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0);
}

/* ------------------------------------------------------------------------ */
/* small helpers                                                              */

/* is name one of the comma-separated names in list? */
static int name_in_list(const char *list, const char *name)
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

static void count_errcode(const char *code)
{
	lg_codes_add(&g.errcodes, code, strlen(code));
}

/* ------------------------------------------------------------------------ */
/* open-loop rate heap                                                        */

static void heap_set(unsigned i, struct gw *gw)
{
	g.heap[i] = gw;
	gw->heap_pos = (int)i;
}

static void heap_up(unsigned i)
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

static void heap_down(unsigned i)
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
static void rate_arm(void)
{
	int64_t due, now_ns;

	if (!g.heap_n || g.stopping)
		return;
	due = g.heap[0]->next_due_ns;
	if (g.rate_armed_ns && g.rate_armed_ns <= due)
		return;
	now_ns = hub_mono_us() * 1000;
	g.rate_armed_ns = due;
	lws_sul_schedule(g.ctx, 0, &g.sul_rate, rate_cb,
			 due > now_ns ? (due - now_ns) / 1000 : 0);
}

static void heap_push(struct gw *gw)
{
	if (gw->heap_pos >= 0)
		return;
	g.heap[g.heap_n] = gw;
	gw->heap_pos = (int)g.heap_n++;
	heap_up(g.heap_n - 1);
	rate_arm();
}

static void heap_remove(struct gw *gw)
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

static struct frame_slot *gw_slot(struct gw *gw, uint64_t seq)
{
	struct frame_slot *fs;

	if (seq < gw->base_seq || seq >= gw->next_seq)
		return NULL;
	fs = &gw->win[seq % g.cfg.inflight];
	if (fs->state == SLOT_FREE || fs->seq != seq)
		return NULL;
	return fs;
}

static void gw_slot_release(struct gw *gw, struct frame_slot *fs)
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

static void gw_slot_make_pending(struct gw *gw, struct frame_slot *fs)
{
	if (fs->state == SLOT_PENDING)
		return;
	fs->state = SLOT_PENDING;
	gw->n_pending++;
	if (fs->seq < gw->send_cursor)
		gw->send_cursor = fs->seq;
}

static struct frame_slot *gw_next_pending(struct gw *gw)
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

static int gw_can_generate(const struct gw *gw)
{
	return gw->state == GW_READY && !g.stopping && !g.cfg.idle &&
	       g.cfg.devices &&
	       (!g.cfg.frames || gw->frames_generated < g.cfg.frames) &&
	       gw->next_seq - gw->base_seq < g.cfg.inflight;
}

static size_t frame_bound(void)
{
	/* --stamp-field adds ,"NAME":<up to 20 digits> to each reading */
	size_t stamp = g.cfg.stamp_field ? strlen(g.cfg.stamp_field) + 24 : 0;

	return 64 + (size_t)g.cfg.batch * (SIM_READING_MAX + stamp);
}

/* --truth: one device's place in its injected anomalies. */
struct inj {
	uint64_t k;            /* readings generated */
	int mode;              /* 0 none, 1 drift, 2 stuck */
	unsigned left;         /* readings of the injection still to come */
	double off, stuck;
};

static double rng_gauss(void)
{
	double u = rng_unit();

	return sqrt(-2.0 * log(u > 0 ? u : 1e-300)) * cos(2 * M_PI * rng_unit());
}

/* The next temperature of device d of gw in an anomaly test set: 21 +
 * N(0, noise-sigma), with spikes (21 +- spike-sigma x sigma, the noise left
 * out), drifts (a ramp of drift-slope x sigma per reading for drift-len
 * readings, then back) and stuck runs (the value frozen for stuck-len
 * readings) started at random; each injected reading is written to the
 * truth file as `device TAB ts TAB spike|drift|stuck`; the first clean-first
 * readings of a device carry none. ts: a day ago plus
 * ts-step-ms per reading of the device. */
static double inject_next(struct gw *gw, unsigned d, int64_t *ts)
{
	const struct sim_cfg *c = &g.cfg;
	struct inj *in = &gw->inj[d];
	double base = 21.0, x = base + c->noise_sigma * rng_gauss();
	const char *kind = NULL;

	*ts = g.truth_ts0 + (int64_t)in->k++ * c->ts_step_ms;
	if (!in->left && in->k > c->clean_first) {
		double u = rng_unit();
		if (u < c->spikes) {
			kind = "spike";
			x = base + (rng_unit() < 0.5 ? -1 : 1) * c->spike_sigma * c->noise_sigma;
		} else if (u < c->spikes + c->drifts) {
			in->mode = 1;
			in->left = c->drift_len;
			in->off = 0;
		} else if (u < c->spikes + c->drifts + c->stuck) {
			in->mode = 2;
			in->left = c->stuck_len;
			in->stuck = x;
		}
	}
	if (in->left) {
		in->left--;
		if (in->mode == 1) {
			in->off += c->drift_slope * c->noise_sigma;
			x += in->off;
			kind = "drift";
		} else {
			x = in->stuck;
			kind = "stuck";
		}
	}
	if (kind)
		fprintf(g.truth, "%s-d%u\t%" PRId64 "\t%s\n", gw->id, d, *ts, kind);
	return x;
}

/* build the next telemetry frame into a free slot: random-walk thermostat data */
static void gw_generate(struct gw *gw)
{
	uint64_t seq = gw->next_seq++;
	struct frame_slot *fs = &gw->win[seq % g.cfg.inflight];
	int64_t now_us = hub_now_us(), ts = now_us / 1000;
	size_t cap = frame_bound(), off;
	unsigned r;

	if (fs->cap < cap) {
		fs->buf = hub_xrealloc(fs->buf, cap);
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
		int64_t rts = ts;
		if (g.truth)
			temp = inject_next(gw, d, &rts);
		if (g.cfg.bad_ratio > 0 && rng_unit() < g.cfg.bad_ratio) {
			temp = 500.0;   /* over the schema's maximum 125 */
			CNT(readings_bad, 1);
		}
		off += (size_t)snprintf(fs->buf + off, cap - off,
			"%s{\"device\":\"%s-d%u\",\"ts\":%" PRId64 ",\"data\":"
			"{\"temperature\":%.2f,\"humidity\":%.2f",
			r ? "," : "", gw->id, d, rts, temp, (double)*h);
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
static void gw_fill_closed_loop(struct gw *gw)
{
	if (g.cfg.rate > 0)
		return;
	while (gw_can_generate(gw))
		gw_generate(gw);
}

static void check_done(struct gw *gw)
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
static void gw_after_window_change(struct gw *gw)
{
	check_done(gw);
	gw_fill_closed_loop(gw);
	gw_request_write(gw);
}

/* ------------------------------------------------------------------------ */
/* control queue (command acks)                                               */

static void gw_ctrl_push(struct gw *gw, json_t *msg)
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
	m = hub_xmalloc(sizeof(*m) + n);
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

static void gw_ctrl_clear(struct gw *gw)
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

static void send_cmd_ack(struct gw *gw, const char *id, const char *status,
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

static void cmd_free(struct sim_cmd *c)
{
	lws_sul_cancel(&c->sul);
	free(c->id);
	free(c->name);
	free(c->version);
	free(c);
}

static void cmd_unlink(struct gw *gw, struct sim_cmd *c)
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
static void cmd_step_cb(lws_sorted_usec_list_t *sul)
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

static void gw_on_command(struct gw *gw, json_t *root)
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

	c = hub_xcalloc(1, sizeof(*c));
	c->gw = gw;
	c->id = hub_xstrdup(id);
	c->name = hub_xstrdup(name);
	ver = json_string_value(json_object_get(params, "version"));
	c->version = ver ? hub_xstrdup(ver) : NULL;
	c->action = action;
	c->stage = g.cfg.cmd_ack_delay_ms ? 0 : 1;
	c->next = gw->cmds;
	gw->cmds = c;
	gw->n_cmds++;
	lws_sul_schedule(g.ctx, 0, &c->sul, cmd_step_cb, (lws_usec_t)1000 *
			 (c->stage ? g.cfg.cmd_delay_ms : g.cfg.cmd_ack_delay_ms));
}

static void gw_on_cancel(struct gw *gw, json_t *root)
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

static void gw_arm_retry(struct gw *gw, int64_t at_us)
{
	int64_t now = hub_mono_us();

	if (gw->retry_armed_at && gw->retry_armed_at <= at_us)
		return;
	gw->retry_armed_at = at_us;
	lws_sul_schedule(g.ctx, 0, &gw->sul_retry, retry_cb,
			 at_us > now ? at_us - now : 0);
}

static void retry_cb(lws_sorted_usec_list_t *sul)
{
	struct gw *gw = lws_container_of(sul, struct gw, sul_retry);
	int64_t now = hub_mono_us(), next = 0;
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

/* The stats line's `streaming`: connections whose first frame was acked
 * (a reconnect storm is over when every gateway streams again). */
static void gw_mark_streaming(struct gw *gw)
{
	if (!gw->streaming) {
		gw->streaming = 1;
		g.n_streaming++;
	}
}

static void gw_become_ready(struct gw *gw)
{
	gw->state = GW_READY;
	g.n_ready++;
	gw->backoff_attempt = 0;
	LOG(LOG_DEBUG, "%s: announced, %u frame(s) to resend", gw->id,
	    gw->n_pending);
	if (g.cfg.rate > 0 && !g.cfg.idle && !gw->done) {
		/* random phase so that N gateways do not tick in lockstep */
		gw->next_due_ns = hub_mono_us() * 1000 +
			(int64_t)(rng_unit() * (double)g.interval_ns);
		heap_push(gw);
	}
	gw_after_window_change(gw);
}

static const char *str_or(const json_t *j, const char *dflt)
{
	const char *s = json_string_value(j);

	return s ? s : dflt;
}

static void reannounce_cb(lws_sorted_usec_list_t *sul)
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
static void gw_announce_reply(struct gw *gw)
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

static void gw_on_announced(struct gw *gw, json_t *root)
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

static void gw_on_ack(struct gw *gw, json_t *root)
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
		uint64_t lat = (uint64_t)(hub_mono_us() - fs->sent_us);

		/* --warmup: the run's latency starts after the connect ramp */
		if (fs->sent_us - g.start_us >= (int64_t)(g.cfg.warmup * 1e6))
			lg_hist_add(&g.h_tot, lat);
		lg_hist_add(&g.h_iv, lat);
	}
	if (json_is_true(json_object_get(root, "duplicate")))
		CNT(duplicate_acks, 1);   /* a resend the hub had already stored */
	gw_mark_streaming(gw);
	CNT(frames_acked, 1);
	CNT(readings_acked, accepted);
	CNT(readings_rejected, nrej);
	gw_slot_release(gw, fs);
	gw_after_window_change(gw);
}

static void gw_on_error(struct gw *gw, json_t *root)
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
		fs->retry_at_us = hub_mono_us() + ra * 1000;
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

static void gw_handle_msg(struct gw *gw, const char *buf, size_t len)
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

static void connect_arm(int64_t delay_us)
{
	if (g.connect_armed || g.stopping)
		return;
	g.connect_armed = 1;
	lws_sul_schedule(g.ctx, 0, &g.sul_connect, connect_pump_cb, delay_us);
}

static void gw_enqueue_connect(struct gw *gw)
{
	if (gw->in_connq || g.stopping)
		return;
	gw->in_connq = 1;
	gw->state = GW_QUEUED;
	g.connq[(g.cq_head + g.cq_count++) % g.cfg.gateways] = gw->idx;
	connect_arm(0);
}

static void gw_lost(struct gw *gw, const char *why);

static const struct hc_cbs gw_cbs;

static void gw_connect(struct gw *gw)
{
	const struct hc_conn_opts co = {
		.url = &g.cfg.u,
		.subprotocol = g.cfg.mqtt ? SIM_MQTT_SUBPROTOCOL : SIM_SUBPROTOCOL,
		.auth = gw->auth,
		.iface = g.cfg.n_src_ips ? g.cfg.src_ips[gw->idx % g.cfg.n_src_ips] : NULL,
		.insecure = g.cfg.insecure,
		.max_message = g.cfg.max_frame,
		.raw = g.cfg.mqtt,
		.cb = &gw_cbs,
		.user = gw,
	};

	gw->state = GW_CONNECTING;
	gw->killed = 0;
	g.n_live++;
	gw->conn = hc_connect(g.x, &co);
	if (!gw->conn) {   /* lws gave up at once: no callback comes */
		CNT(connect_failures, 1);
		gw_lost(gw, "connect failed");
	}
}

static void connect_pump_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	g.connect_armed = 0;
	if (g.stopping)
		return;
	lg_bucket_refill(&g.conn_bucket, hub_mono_us());
	/* --max-connecting: lws keeps each opening connection's timeout in one
	 * sorted list and every new one walks it (all of them at 1e6/s) */
	while (g.cq_count && (!g.cfg.max_connecting ||
			      g.n_live - g.n_connected < g.cfg.max_connecting) &&
	       lg_bucket_take(&g.conn_bucket)) {
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

static void backoff_cb(lws_sorted_usec_list_t *sul)
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
static void gw_lost(struct gw *gw, const char *why)
{
	int64_t base, delay;
	uint64_t s;

	if (gw->state != GW_CONNECTING && gw->state != GW_ANNOUNCING &&
	    gw->state != GW_READY)
		return;
	if (gw->state == GW_READY)
		g.n_ready--;
	if (gw->streaming) {
		g.n_streaming--;
		gw->streaming = 0;
	}
	if (gw->state != GW_CONNECTING) {
		g.n_connected--;
		if (!g.stopping)   /* closes we start at stop are not disconnects */
			CNT(disconnects, 1);
	}
	g.n_live--;
	gw->conn = NULL;
	gw->mqtt_rx.len = 0;
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

/* closes the connection from its next writeable turn */
static void gw_kill(struct gw *gw, int code, const char *reason)
{
	if (gw->killed || !gw->conn)
		return;
	gw->killed = 1;
	hc_close(gw->conn, code, reason);
}

/* at stop, a gateway closes once nothing it owes the hub is outstanding */
static int gw_drained(const struct gw *gw)
{
	return !gw->n_used && !gw->cq_len && !gw->n_cmds;
}

static void gw_request_write(struct gw *gw)
{
	if (!gw->conn || (gw->state != GW_ANNOUNCING && gw->state != GW_READY))
		return;
	if (g.closing || (g.stopping && gw_drained(gw)) ||
	    gw->n_pending || (gw->state == GW_READY && gw->cq_head) ||
	    (gw->state == GW_ANNOUNCING && (g.cfg.mqtt ? !gw->ann_sent :
					     gw->ann_next < g.cfg.devices)))
		hc_want_write(gw->conn);
}

/* next announce message: up to 1000 devices and at most max_frame bytes */
static size_t build_announce(struct gw *gw, char *out, size_t cap)
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
 * or share WebSocket messages: the connection is a byte stream here.
 */

static size_t mqtt_build_connect(const struct gw *gw, unsigned char *o)
{
	return lg_mqtt_connect(o, gw->id, strlen(gw->id), SIM_MQTT_KEEPALIVE_S);
}

/* PUBLISH QoS 1 of fs into o (room: SIM_MQTT_HDR_MAX + fs->len) */
static size_t mqtt_build_publish(const struct gw *gw, const struct frame_slot *fs,
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
static void frame_written(struct gw *gw, struct frame_slot *fs)
{
	fs->state = SLOT_INFLIGHT;
	fs->sent_us = hub_mono_us();
	gw->n_pending--;
	gw->send_cursor = fs->seq + 1;
	CNT(frames_sent, 1);
	if (fs->written)
		CNT(frames_resent, 1);
	else
		CNT(readings_sent, fs->nreadings);
	fs->written = 1;
}

static void mqtt_writeable(struct gw *gw, unsigned char *p)
{
	struct frame_slot *fs = NULL;
	size_t len;
	int connect = 0;

	if (gw->state == GW_ANNOUNCING) {
		if (gw->ann_sent)
			return;
		len = mqtt_build_connect(gw, p);
		connect = 1;
	} else if (gw->state == GW_READY && gw->mqtt_ping) {
		p[0] = 0xc0;   /* PINGREQ */
		p[1] = 0;
		len = 2;
	} else if (gw->state == GW_READY && (fs = gw_next_pending(gw))) {
		len = mqtt_build_publish(gw, fs, p);
	} else
		return;

	if (hc_write(gw->conn, p, len, 1)) {
		LOG(LOG_WARN, "%s: write failed", gw->id);
		return;
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
}

static void mqtt_on_puback(struct gw *gw, unsigned pid)
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
		uint64_t lat = (uint64_t)(hub_mono_us() - fs->sent_us);

		if (fs->sent_us - g.start_us >= (int64_t)(g.cfg.warmup * 1e6))
			lg_hist_add(&g.h_tot, lat);
		lg_hist_add(&g.h_iv, lat);
	}
	gw_mark_streaming(gw);
	CNT(frames_acked, 1);
	CNT(readings_acked, fs->nreadings);
	gw_slot_release(gw, fs);
	gw_after_window_change(gw);
}

/* one whole MQTT packet from the broker: type byte, body */
static void mqtt_packet(void *ctx, unsigned type, const unsigned char *b, size_t n)
{
	struct gw *gw = ctx;

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

static void mqtt_receive(struct gw *gw, const void *in, size_t len)
{
	if (lg_mqtt_feed(&gw->mqtt_rx, in, len, g.cfg.max_frame, mqtt_packet, gw)) {
		CNT(proto_errors, 1);
		gw_kill(gw, LWS_CLOSE_STATUS_PROTOCOL_ERR, "bad MQTT stream");
	}
}

/* keepalive: a PINGREQ every 30 s (the broker drops a client silent 90 s) */
static void mqtt_ping_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	(void)sul;
	for (i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];

		if (gw->state == GW_READY && gw->conn) {
			gw->mqtt_ping = 1;
			hc_want_write(gw->conn);
		}
	}
	if (!g.stopping)
		lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
				 SIM_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
}

static void gw_writeable(struct hc_conn *conn, void *user)
{
	struct gw *gw = user;
	unsigned char *p;
	struct frame_slot *fs = NULL;
	struct ctrl_msg *cm = NULL;
	const void *data;
	size_t len = 0;
	int announce = 0;

	if (g.closing || (g.stopping && gw_drained(gw)) ||
	    (g.stopping && gw->state != GW_READY)) {
		hc_close(conn, LWS_CLOSE_STATUS_NORMAL, "simulator stopping");
		return;
	}
	p = hc_txbuf(g.x, g.cfg.max_frame + SIM_MQTT_HDR_MAX);
	if (g.cfg.mqtt) {
		mqtt_writeable(gw, p);
		return;
	}
	if (gw->state == GW_ANNOUNCING) {
		if (gw->ann_next >= g.cfg.devices)
			return;
		len = build_announce(gw, (char *)p, g.cfg.max_frame);
		if (!len) {
			LOG(LOG_ERR, "%s: one device does not fit in --max-frame",
			    gw->id);
			gw_kill(gw, LWS_CLOSE_STATUS_UNEXPECTED_CONDITION, "announce too large");
			return;
		}
		data = p;
		announce = 1;
	} else if (gw->state == GW_READY && gw->cq_head) {
		cm = gw->cq_head;
		data = cm->data;
		len = cm->len;
	} else if (gw->state == GW_READY && (fs = gw_next_pending(gw))) {
		data = fs->buf;   /* copied: lws masks what it writes in place */
		len = fs->len;
	} else
		return;

	if (hc_write(conn, data, len, 0)) {
		LOG(LOG_WARN, "%s: write failed", gw->id);
		return;
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
}

static void gw_established(struct hc_conn *conn, void *user)
{
	struct gw *gw = user;

	gw->state = GW_ANNOUNCING;
	g.n_connected++;
	CNT(connects, 1);
	gw->ann_next = 0;
	gw->ann_sent = 0;
	gw->ann_replies = 0;
	gw->ann_retry_ms = 0;
	gw->mqtt_rx.len = 0;
	LOG(LOG_DEBUG, "%s: connected", gw->id);
	if (g.stopping) {
		hc_want_write(conn);
		return;
	}
	if (!g.cfg.devices && !g.cfg.mqtt) {
		gw_become_ready(gw);
		return;
	}
	gw_request_write(gw);   /* --mqtt: CONNECT, then CONNACK makes it ready */
}

static void gw_receive(struct hc_conn *conn, const char *msg, size_t len, void *user)
{
	struct gw *gw = user;

	if (g.cfg.mqtt) {
		mqtt_receive(gw, msg, len);
	} else if (!msg) {
		LOG(LOG_WARN, "%s: hub message over --max-frame %" PRIu64 " bytes, "
		    "closing 1009", gw->id, g.cfg.max_frame);
		CNT(proto_errors, 1);
		gw_kill(gw, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE, "message too large");
	} else {
		gw_handle_msg(gw, msg, len);
	}
}

static void gw_closed(struct hc_conn *conn, const struct hc_end *end, void *user)
{
	struct gw *gw = user;
	char why[64];

	if (end->error) {
		CNT(connect_failures, 1);
		if (end->status == 401)
			CNT(auth_failures, 1);
		LOG(LOG_WARN, "%s: connection failed: %s", gw->id, end->error);
	}
	if (end->close_code == 4001) {
		CNT(takeovers, 1);
		LOG(LOG_WARN, "%s: taken over by another connection with the same "
		    "sub (close 4001: %s)", gw->id, end->reason);
	} else if (end->close_code) {
		LOG(LOG_INFO, "%s: hub closed with %d: %s", gw->id, end->close_code,
		    end->reason);
	}
	if (end->close_code)
		snprintf(why, sizeof(why), "closed with %d", end->close_code);
	else
		snprintf(why, sizeof(why), "%s", gw->state == GW_CONNECTING ?
			 "connect failed" : "connection lost");
	gw_lost(gw, why);
}

static const struct hc_cbs gw_cbs = { gw_established, gw_receive, gw_writeable, gw_closed };

/* ------------------------------------------------------------------------ */
/* timers: rate, stats, stop                                                  */

static void gw_tick(struct gw *gw, int64_t now_ns)
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

static void rate_cb(lws_sorted_usec_list_t *sul)
{
	int64_t now_ns = hub_mono_us() * 1000;

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

static void print_stats_line(int64_t now)
{
	double dt = (double)(now - g.last_stats_us) / 1e6;
	uint64_t unacked = 0;
	unsigned i;

	for (i = 0; i < g.cfg.gateways; i++)
		unacked += g.gws[i].n_used;
	if (dt <= 0)
		dt = 1e-9;
	fprintf(stderr,
		"[%7.1fs] conn %u/%u ready %u streaming %u | sent %.0f f/s (resent %" PRIu64
		") | acked %.0f r/s | unacked %" PRIu64 " | rej %" PRIu64
		" | err %" PRIu64
		" | unavail %" PRIu64 " | cfail %" PRIu64 " disc %" PRIu64
		" | p50 %.2f p99 %.2f ms\n",
		(double)(now - g.start_us) / 1e6, g.n_connected, g.cfg.gateways,
		g.n_ready, g.n_streaming, (double)g.iv.frames_sent / dt, g.iv.frames_resent,
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
static void watchdog_cb(lws_sorted_usec_list_t *sul)
{
	int64_t now = hub_mono_us(), limit = (int64_t)(g.cfg.ack_timeout * 1e6);
	unsigned i;

	(void)sul;
	for (i = 0; i < g.cfg.gateways && !g.stopping; i++) {
		struct gw *gw = &g.gws[i];
		uint64_t s;

		if (gw->state != GW_READY || gw->killed || !gw->n_used)
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

static void duration_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	begin_stop("--duration elapsed");
}

static void destroy_cb(lws_sorted_usec_list_t *sul)
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
	lws_sul_cancel(&g.sul_watchdog);
	lws_sul_cancel(&g.sul_mqtt_ping);
	hc_stop(g.x);
}

static void close_all(void)
{
	unsigned i;

	for (i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];

		if (gw->conn && gw->state == GW_CONNECTING)
			hc_close(gw->conn, 0, NULL);
		else if (gw->conn)
			hc_want_write(gw->conn);
	}
}

static void drain_cb(lws_sorted_usec_list_t *sul)
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
static void begin_stop(const char *why)
{
	unsigned i;

	if (g.stopping)
		return;
	g.stopping = 1;
	g.stop_reason = why;
	g.stop_us = hub_mono_us();
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

/* SIGINT/SIGTERM: the first stops, the second closes at once */
static void on_signal(struct hc_ctx *x, int n)
{
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

static void print_summary(void)
{
	double el = (double)((g.stop_us ? g.stop_us : hub_mono_us()) - g.start_us) / 1e6;
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
		json_t *rj = json_object(), *ec = json_object(), *cmds = json_object(), *o;
		int k;

		for (k = 0; k < RJ_COUNT; k++)
			json_object_set_new(rj, rj_names[k],
					    json_integer((json_int_t)g.tot.rejected[k]));
		for (i = 0; i <= LG_CODES; i++)
			if (i < g.errcodes.len || (i == LG_CODES && g.errcodes.n[i]))
				json_object_set_new(ec, g.errcodes.name[i],
						    json_integer((json_int_t)g.errcodes.n[i]));

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
		json_object_set_new(o, "client", json_string(g.cfg.sdk ? "libiothub-gw" : "gw-sim"));
		json_object_set_new(o, "acks", JI(g.tot.frames_acked));
		json_object_set_new(o, "errors", JI(g.tot.hub_errors +
			g.tot.proto_errors + g.tot.ack_mismatch));
#define X(f, k) json_object_set_new(o, k, JI(g.tot.f));
		SIM_COUNTERS(X)
#undef X
		json_object_set_new(o, "frames_unacked_at_end", JI(unacked));
		json_object_set_new(o, "rejected_by_code", rj);
		json_object_set_new(o, "hub_errors_by_code", ec);
		json_object_set_new(o, "commands", cmds);
#define X(f, k) json_object_set_new(cmds, k, JI(g.tot.f));
		SIM_CMD_COUNTERS(X)
#undef X
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
/* --sdk: the gateways are libiothub-gw's (docs/sdk.md), one poll() loop      */

/* The library does what the code above does by hand (announce, seq, resend,
 * back-off, command acks) plus the on-disk spool, so this mode exercises it
 * under the simulator's fleets and suites. One thread: every gateway's
 * descriptor (iothub_gw_fd()) in one poll(), readings generated between
 * turns; the summary's counters come from the library's statistics. */

struct sdk_sim {
	struct iothub_gw *h;
	uint64_t sent;           /* readings send() accepted */
	unsigned dev;            /* next device, round robin */
};

static volatile sig_atomic_t sdk_stop;

static void sdk_on_signal(int sig)
{
	(void)sig;
	sdk_stop = sdk_stop + 1;   /* the second one: stop without draining */
}

static void sdk_on_reject(struct iothub_gw *h, const struct iothub_gw_reject *r, void *user)
{
	int k;

	for (k = 0; k < RJ_OTHER; k++)
		if (r->code && !strcmp(r->code, rj_names[k]))
			break;
	g.tot.rejected[k]++;
}

static void sdk_on_state(struct iothub_gw *h, enum iothub_gw_state st, int code,
			 const char *why, void *user)
{
	struct gw *gw = user;

	if (st == IOTHUB_GW_ONLINE)
		g.tot.connects++;
	if (st == IOTHUB_GW_DISCONNECTED) {
		if (code == 401 || code == 4401)
			g.tot.auth_failures++;
		else if (code == 4001)
			g.tot.takeovers++;
		LOG(LOG_INFO, "%s: disconnected %d %s", gw->id, code, why);
	}
}

static void sdk_on_command(struct iothub_gw *h, const struct iothub_gw_command *c, void *user)
{
	g.tot.cmds_received++;
	if (!iothub_gw_cmd_succeeded(h, c->id, NULL))
		g.tot.cmd_acks_sent += 2;   /* received (by the library) and this */
}

/* One reading of gateway i into its spool. Returns 0, or -1 when refused. */
static int sdk_send(struct sdk_sim *s, unsigned i)
{
	char dev[SIM_ID_MAX + 16], data[64], err[256];
	int bad = g.cfg.bad_ratio > 0 && rng_unit() < g.cfg.bad_ratio;
	int rc;

	snprintf(dev, sizeof(dev), "%s-d%u", g.gws[i].id, s->dev);
	s->dev = (s->dev + 1) % g.cfg.devices;
	if (bad)
		snprintf(data, sizeof(data), "{\"temperature\":500}");
	else
		snprintf(data, sizeof(data), "{\"temperature\":%.2f}", 18.0 + 8.0 * rng_unit());
	rc = iothub_gw_send(s->h, dev, (int64_t)(hub_now_us() / 1000), data, err, sizeof(err));
	if (rc) {
		if (rc != IOTHUB_GW_ESPOOL_FULL)
			LOG(LOG_WARN, "%s: send: %s", g.gws[i].id, err);
		return -1;
	}
	s->sent++;
	g.tot.readings_sent++;
	g.tot.readings_bad += (uint64_t)bad;
	return 0;
}

/* Readings due now: open loop by the clock, closed loop up to a full
 * window (batch x inflight readings not yet acked). */
static void sdk_generate(struct sdk_sim *sims, int64_t now_us, int *more)
{
	uint64_t cap = g.cfg.frames ? g.cfg.frames * g.cfg.batch : UINT64_MAX;

	*more = 0;
	if (g.cfg.idle || !g.cfg.devices)
		return;
	for (unsigned i = 0; i < g.cfg.gateways; i++) {
		struct sdk_sim *s = &sims[i];
		uint64_t want;

		if (g.cfg.rate > 0) {
			want = (uint64_t)((double)(now_us - g.start_us) / 1e6 * g.cfg.rate);
		} else {
			struct iothub_gw_stats st;

			iothub_gw_stats(s->h, &st);
			want = s->sent + ((uint64_t)g.cfg.batch * g.cfg.inflight > st.pending ?
					  (uint64_t)g.cfg.batch * g.cfg.inflight - st.pending : 0);
		}
		if (want > cap)
			want = cap;
		while (s->sent < want && !sdk_send(s, i))
			;
		if (s->sent < cap)
			*more = 1;
	}
}

static int sdk_run(void)
{
	struct sdk_sim *sims = calloc(g.cfg.gateways, sizeof(*sims));
	struct pollfd *pfd = calloc(g.cfg.gateways, sizeof(*pfd));
	int64_t end_us, drain_end = 0;
	unsigned i, d;
	int rc = 0, more = 1;

	if (!sims || !pfd)
		abort();
	if (mkdir(g.cfg.sdk, 0700) && errno != EEXIST) {
		fprintf(stderr, "gw-sim: --sdk %s: %s\n", g.cfg.sdk, strerror(errno));
		free(sims);
		free(pfd);
		return 1;
	}
	signal(SIGINT, sdk_on_signal);
	signal(SIGTERM, sdk_on_signal);
	for (i = 0; i < g.cfg.gateways && !rc; i++) {
		struct iothub_gw_opts o = { 0 };
		char dir[4096], err[256];
		short ev;

		snprintf(dir, sizeof(dir), "%s/%s", g.cfg.sdk, g.gws[i].id);
		o.url = g.cfg.url;
		o.token = g.gws[i].auth + strlen("Bearer ");
		o.ca_file = g.cfg.ca;
		o.cert_file = g.cfg.cert;
		o.key_file = g.cfg.key;
		o.tls_insecure = g.cfg.insecure;
		o.spool_dir = dir;
		o.max_readings = (int)(g.cfg.batch > 1000 ? 1000 : g.cfg.batch);
		o.max_inflight = (int)(g.cfg.inflight > 1024 ? 1024 : g.cfg.inflight);
		o.ack_timeout_ms = g.cfg.ack_timeout > 0 ? (int)(g.cfg.ack_timeout * 1000) : -1;
		o.backoff_min_ms = SIM_BACKOFF_MIN_MS;
		o.backoff_max_ms = SIM_BACKOFF_MAX_MS;
		o.on_reject = sdk_on_reject;
		o.on_state = sdk_on_state;
		o.user = &g.gws[i];
		sims[i].h = iothub_gw_new(&o, err, sizeof(err));
		if (!sims[i].h) {
			fprintf(stderr, "gw-sim: %s: %s\n", g.gws[i].id, err);
			rc = 1;
			break;
		}
		iothub_gw_on_command(sims[i].h, NULL, sdk_on_command, NULL);
		for (d = 0; d < g.cfg.devices && !rc; d++) {
			char dev[SIM_ID_MAX + 16];

			snprintf(dev, sizeof(dev), "%s-d%u", g.gws[i].id, d);
			if (iothub_gw_announce(sims[i].h, dev, g.cfg.device_type, g.labels_json,
					       err, sizeof(err))) {
				fprintf(stderr, "gw-sim: %s: %s\n", dev, err);
				rc = 1;
			}
		}
		pfd[i].fd = iothub_gw_fd(sims[i].h, &ev);
		pfd[i].events = ev;
	}
	LOG(LOG_INFO, "%u libiothub-gw gateway(s) x %u device(s) -> %s (%s loop)",
	    g.cfg.gateways, g.cfg.devices, g.cfg.url,
	    g.cfg.idle ? "idle" : g.cfg.rate > 0 ? "open" : "closed");
	g.start_us = hub_mono_us();
	end_us = g.cfg.duration > 0 ? g.start_us + (int64_t)(g.cfg.duration * 1e6) : 0;
	while (!rc) {
		int64_t now = hub_mono_us();
		int wait = 1000;
		uint64_t pending = 0;

		if (!drain_end && (sdk_stop || (end_us && now >= end_us) ||
				   (g.cfg.frames && !more))) {
			g.stop_reason = sdk_stop ? "signal" : end_us && now >= end_us ?
					"duration" : "frames";
			g.stop_us = now;
			drain_end = now + (int64_t)SIM_DRAIN_MS * 1000;
		}
		if (!drain_end)
			sdk_generate(sims, now, &more);
		for (i = 0; i < g.cfg.gateways; i++) {
			struct iothub_gw_stats st;
			int t = iothub_gw_next_timeout(sims[i].h);

			if (t < wait)
				wait = t;
			iothub_gw_stats(sims[i].h, &st);
			pending += st.pending;
		}
		if (drain_end && (!pending || now >= drain_end || sdk_stop > 1))
			break;
		if (!drain_end && g.cfg.rate > 0 && wait > 5)
			wait = 5;   /* the open loop's clock */
		poll(pfd, g.cfg.gateways, wait);
		for (i = 0; i < g.cfg.gateways; i++)
			iothub_gw_service(sims[i].h, 0);
	}
	for (i = 0; i < g.cfg.gateways; i++) {
		struct iothub_gw_stats st;

		if (!sims[i].h)
			continue;
		iothub_gw_stats(sims[i].h, &st);
		g.tot.frames_sent += st.frames_sent;
		g.tot.frames_acked += st.frames_acked;
		g.tot.readings_acked += st.acked;
		g.tot.readings_rejected += st.rejected;
		g.tot.unavailable += st.unavailable;
		g.tot.disconnects += st.reconnects;
		g.tot.ack_timeouts += st.ack_timeouts;
		g.tot.duplicate_acks += st.duplicates;
		g.gws[i].n_used = (unsigned)st.pending;   /* readings left in the spool */
		iothub_gw_free(sims[i].h);
	}
	if (!g.stop_us)
		g.stop_us = hub_mono_us();
	free(sims);
	free(pfd);
	return rc;
}

/* ------------------------------------------------------------------------ */
/* command line                                                               */

/* --cmd-fail / --cmd-ignore: a probability 0..1 (a number; op->data is where
 * it goes), else names */
static int names_or_prob(void *obj, const struct opt *op, const char *arg, char *err, size_t errlen)
{
	char **names = (char **)(void *)((char *)obj + op->off), *end;
	double v;

	errno = 0;
	v = strtod(arg, &end);
	*(double *)(void *)op->data = 0;
	if (*arg && !*end && !errno && (isdigit((unsigned char)*arg) || *arg == '.')) {
		if (!(v >= 0 && v <= 1)) {
			snprintf(err, errlen, "--%s: a probability is from 0 to 1, got '%s'",
				 op->name, arg);
			return -1;
		}
		*(double *)(void *)op->data = v;
		free(*names);
		*names = NULL;
	} else if (!*arg) {
		snprintf(err, errlen, "--%s: empty list", op->name);
		return -1;
	}
	return 0;
}

static int seq_start_set(void *obj, const struct opt *op, const char *arg, char *err, size_t errlen)
{
	g.cfg.seq_start_set = 1;
	return 0;
}

#define F(f) offsetof(struct sim_cfg, f)
#define HEADING(h) { NULL, 0, 0, NULL, 0, 0, h }

static const struct opt sim_opts[] = {
	HEADING("Connection"),
	{ "url", OPT_STR, F(url), "ws://127.0.0.1:8080/v1/gateway", 0, 0,
	  "ws:// or wss:// endpoint ([v6] literals work)", "URL" },
	{ "token", OPT_STR, F(token), NULL, 0, 0, "bearer token used by every gateway", "JWT" },
	{ "token-cmd", OPT_STR, F(token_cmd), NULL, 0, 0, "run once per gateway at start; {sub} "
	  "is replaced by the\ngateway id; stdout is the token", "'CMD'" },
	{ "jwt-secret", OPT_STR, F(jwt_secret), NULL, 0, 0, "mint each gateway's HS256 token "
	  "in-process with this\nsecret (the file's bytes less trailing CR/LF, as the hub)",
	  "FILE" },
	{ "jwt-devices", OPT_STR, F(jwt_devices), NULL, 0, 0, "devices claim of minted tokens: "
	  "comma-separated patterns,\n{sub} is replaced by the gateway id (default *)", "LIST" },
	{ "ttl", OPT_U64, F(ttl), NULL, 1, 10.0 * 366 * 24 * 3600, "minted tokens expire S "
	  "seconds after start (default 3600)", "S" },
	{ "ca", OPT_STR, F(ca), NULL, 0, 0, "CA bundle to verify the hub (wss)", "FILE" },
	{ "cert", OPT_STR, F(cert), NULL, 0, 0, "client certificate for mTLS (with --key)", "FILE" },
	{ "key", OPT_STR, F(key), NULL, 0, 0, "its private key", "FILE" },
	{ "insecure", OPT_FLAG, F(insecure), NULL, 0, 0, "do not verify the hub's certificate" },
	{ "source-ips", OPT_STR, F(src), NULL, 0, 0, "bind connections round-robin to these "
	  "local addresses", "A,B,.." },
	{ "connect-rate", OPT_DBL, F(connect_rate), "1000", 0.01, 1e6, "new connections per "
	  "second, also reconnects", "C" },
	{ "max-connecting", OPT_UINT, F(max_connecting), "0", 0, 1000000, "at most K connections "
	  "opening at once (TCP and\nupgrade), 0 = no limit: a reconnect storm from one\n"
	  "process without lws's per-connect timer walk", "K" },
	{ "mqtt", OPT_FLAG, F(mqtt), NULL, 0, 0, "speak MQTT 3.1.1 over WebSocket (subprotocol mqtt, "
	  "binary\nframes) to a broker such as Mosquitto instead: CONNECT\n(client id = gateway "
	  "id, clean session, keepalive 60),\nthen each frame's JSON as one PUBLISH QoS 1 to\n"
	  "tele/<gateway>; its PUBACK is the ack. No token needed;\nno announce, no commands "
	  "(docs/simulator.md)" },
	HEADING("Fleet"),
	{ "gateways", OPT_UINT, F(gateways), "1", 1, 1000000, "gateways", "N" },
	{ "devices", OPT_UINT, F(devices), "10", 0, 1000000, "devices per gateway", "M" },
	{ "gateway-prefix", OPT_STR, F(gw_prefix), "gw", 0, 0, "gateway ids P-0000, P-0001, ...",
	  "P" },
	{ "device-type", OPT_STR, F(device_type), "thermostat", 0, 0, "device type announced", "T" },
	{ "labels", OPT_STR, F(labels), NULL, 0, 0, "labels announced with every device",
	  "k=v,k=v" },
	HEADING("Traffic"),
	{ "rate", OPT_DBL, F(rate), "0", 0, 1e7, "readings/s per gateway, open loop; 0 = closed "
	  "loop", "R" },
	{ "batch", OPT_UINT, F(batch), "1", 1, 10000, "readings per telemetry frame", "B" },
	{ "inflight", OPT_UINT, F(inflight), "1", 1, 100000, "unacked frames per gateway", "K" },
	{ "duration", OPT_DBL, F(duration), "0", 0, 1e7, "stop after S seconds (0 = until "
	  "SIGINT/SIGTERM)", "S" },
	{ "frames", OPT_U64, F(frames), NULL, 0, UINT64_MAX / 2, "stop each gateway after F "
	  "frames, all acked", "F" },
	{ "ack-timeout", OPT_DBL, F(ack_timeout), "30", 0, 86400, "reconnect when a frame waits S "
	  "s for its ack (0 = wait\nforever)", "S" },
	{ "bad-ratio", OPT_DBL, F(bad_ratio), NULL, 0, 1, "fraction of readings made invalid "
	  "(temperature 500)", "X" },
	{ "stamp-field", OPT_STR, F(stamp_field), NULL, 0, 0, "also put NAME: wall-clock Unix "
	  "microseconds at generation\nin every reading's data (the device type must allow it,\n"
	  "e.g. bench/device-types/bench.json: sent_us)", "NAME" },
	{ "idle", OPT_FLAG, F(idle), NULL, 0, 0, "connect and announce, then send no telemetry" },
	{ "sdk", OPT_STR, F(sdk), NULL, 0, 0, "each gateway is a libiothub-gw gateway (docs/sdk.md) "
	  "with its\nspool in DIR/<gateway id>, all driven from one poll() loop;\n--batch is "
	  "its max_readings, --inflight its max_inflight,\n--ack-timeout its ack_timeout_ms; "
	  "commands succeed\n(docs/simulator.md)", "DIR" },
	HEADING("Anomaly test sets (docs/simulator.md)"),
	{ "truth", OPT_STR, F(truth), NULL, 0, 0, "temperature becomes 21 + N(0, noise-sigma) with "
	  "the\ninjections below; each injected reading is written to\nFILE as "
	  "`device TAB ts TAB spike|drift|stuck`", "FILE" },
	{ "noise-sigma", OPT_DBL, F(noise_sigma), "0.5", 0, 1000, "noise of the test set", "S" },
	{ "spikes", OPT_DBL, F(spikes), "0", 0, 1, "probability of a spike per reading", "P" },
	{ "spike-sigma", OPT_DBL, F(spike_sigma), "5", 0, 1000, "spike height in noise sigmas", "K" },
	{ "drifts", OPT_DBL, F(drifts), "0", 0, 1, "probability that a drift starts", "P" },
	{ "drift-len", OPT_UINT, F(drift_len), "80", 1, 1000000, "readings per drift", "N" },
	{ "drift-slope", OPT_DBL, F(drift_slope), "0.25", 0, 1000, "drift per reading in noise "
	  "sigmas", "K" },
	{ "stuck", OPT_DBL, F(stuck), "0", 0, 1, "probability that a stuck run starts", "P" },
	{ "stuck-len", OPT_UINT, F(stuck_len), "40", 1, 1000000, "readings per stuck run", "N" },
	{ "clean-first", OPT_UINT, F(clean_first), "0", 0, 1000000, "readings of each device "
	  "before the first injection\n(a detector's warm-up learns clean data)", "N" },
	{ "ts-step-ms", OPT_UINT, F(ts_step_ms), "1000", 1, 86400000, "ts of a device's readings: "
	  "a day ago, then +MS each", "MS" },
	{ "truth-ago-ms", OPT_DBL, F(truth_ago_ms), "86400000", 0, 864000000, "how long ago the "
	  "first reading's ts is (live charts: a\nminute, with ts-step-ms under the reading period)", "MS" },
	{ "seq-start", OPT_U64, F(seq_start), NULL, 0, 1ull << 52, "first seq of gateway 0; "
	  "gateway i starts at N + i*1e9\n(default N: Unix time in microseconds, so a restarted\n"
	  "simulator never reuses a seq the hub already stored)", "N", 0, seq_start_set },
	{ "seed", OPT_U64, F(seed), NULL, 0, UINT64_MAX, "random seed (default: time and pid)",
	  "N" },
	{ "max-frame", OPT_U64, F(max_frame), "65536", 1024, 16u << 20, "largest frame sent or "
	  "accepted", "BYTES" },
	HEADING("Commands"),
	{ "cmd-ack-delay-ms", OPT_UINT, F(cmd_ack_delay_ms), "0", 0, 3600000, "delay before "
	  "`received`", "MS" },
	{ "cmd-delay-ms", OPT_UINT, F(cmd_delay_ms), "200", 0, 3600000, "delay before each later "
	  "step", "MS" },
	{ "cmd-steps", OPT_UINT, F(cmd_steps), "4", 1, 100, "firmware_update progress reports "
	  "0..100 in N steps\n(4: 0, 25, 50, 75, 100)", "N" },
	{ "cmd-fail", OPT_STR, F(cmd_fail), NULL, 0, 0, "report these commands failed "
	  "(comma-separated names),\nor any command with probability P (0..1)", "NAMES|P", 0,
	  names_or_prob, &g.cfg.cmd_fail_p },
	{ "cmd-ignore", OPT_STR, F(cmd_ignore), NULL, 0, 0, "send nothing at all for these "
	  "commands, or for a\ndelivery with probability P (0..1)", "NAMES|P", 0, names_or_prob,
	  &g.cfg.cmd_ignore_p },
	{ "cmd-reject", OPT_STR, F(cmd_reject), NULL, 0, 0, "reject these commands as unsupported",
	  "NAMES" },
	HEADING("Output"),
	{ "json-summary", OPT_FLAG, F(json_summary), NULL, 0, 0, "final JSON summary on stdout" },
	{ "warmup", OPT_DBL, F(warmup), "0", 0, 1e6, "leave frames sent in the first S s out of "
	  "the summary's\nlatency_us (the connect ramp)", "S" },
	LG_OPTS(struct sim_cfg, stats_interval),
};

#define NOPTS (sizeof(sim_opts) / sizeof(sim_opts[0]))

/* "k=v,k=v" -> compact JSON object text, or NULL for none */
static char *parse_labels(const char *s)
{
	json_t *o = json_object();
	char *dup = hub_xstrdup(s), *save = NULL, *tok, *out;

	for (tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(tok, '=');

		if (!eq || eq == tok)
			opts_die("--labels: expected k=v[,k=v...], got '%s'", s);
		*eq = '\0';
		if (json_object_set_new(o, tok, json_string(eq + 1)))
			opts_die("--labels: not valid UTF-8: '%s'", s);
	}
	free(dup);
	out = json_object_size(o) ? json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
	json_decref(o);
	return out;
}

/* what the flags mean together */
static void check_args(void)
{
	struct sim_cfg *c = &g.cfg;
	char err[256], *save = NULL, *tok;
	json_t *js;

	if (hc_url_parse(&c->u, c->url, HC_WS, err, sizeof(err)))
		opts_die("--url: %s", err);
	if (c->mqtt ? !!c->token + !!c->token_cmd + !!c->jwt_secret > 1 :
	    !!c->token + !!c->token_cmd + !!c->jwt_secret != 1)
		opts_die("give exactly one of --token, --token-cmd and --jwt-secret%s",
		       c->mqtt ? " (or none with --mqtt)" : "");
	if (c->mqtt && c->inflight > SIM_MQTT_PIDS)
		opts_die("--inflight: at most %u with --mqtt (16-bit packet ids)", SIM_MQTT_PIDS);
	if ((c->jwt_devices || c->ttl) && !c->jwt_secret)
		opts_die("--jwt-devices and --ttl need --jwt-secret");
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
		opts_die("--cert and --key go together");
	if (c->sdk && (c->mqtt || c->src || c->truth || c->stamp_field))
		opts_die("--sdk does not go with --mqtt, --source-ips, --truth or --stamp-field");
	if ((c->ca || c->cert || c->insecure) && !c->u.tls)
		opts_die("--ca, --cert, --key and --insecure need a wss:// --url");
	if (strlen(c->gw_prefix) > SIM_ID_MAX - 24 ||
	    !hub_id_valid(c->gw_prefix, strlen(c->gw_prefix)))
		opts_die("--gateway-prefix: must match [A-Za-z0-9._:-]{1,104}, got '%s'",
		       c->gw_prefix);
	if (c->stamp_field) {
		const char *q = c->stamp_field;

		while (*q && (isalnum((unsigned char)*q) || *q == '_'))
			q++;
		if (!*c->stamp_field || *q || q - c->stamp_field > 64)
			opts_die("--stamp-field: must match [A-Za-z0-9_]{1,64}, got '%s'",
			       c->stamp_field);
		if (!strcmp(c->stamp_field, "temperature") ||
		    !strcmp(c->stamp_field, "humidity"))
			opts_die("--stamp-field: '%s' is already in every reading", c->stamp_field);
	}
	if (c->cmd_reject && !*c->cmd_reject)
		opts_die("--cmd-reject: empty list");
	if (!*c->device_type || strlen(c->device_type) > SIM_ID_MAX)
		opts_die("--device-type: 1 to %u characters", SIM_ID_MAX);
	if (c->rate > 0 && c->rate / c->batch > 1e6)
		opts_die("--rate/--batch: more than 1e6 frames/s per gateway");
	if (c->idle && (c->rate > 0 || c->frames))
		opts_die("--idle sends no telemetry: drop --rate/--frames");
	if (c->labels) {
		g.labels_json = parse_labels(c->labels);
		if (g.labels_json && strlen(g.labels_json) > 256)
			opts_die("--labels: at most 256 bytes of JSON");
	}
	js = json_string(c->device_type);
	if (!js)
		opts_die("--device-type: not valid UTF-8");
	g.dev_type_json = json_dumps(js, JSON_ENCODE_ANY);
	json_decref(js);
	if (frame_bound() > c->max_frame)
		opts_die("--batch %u can make frames of %zu bytes, over --max-frame %" PRIu64,
		       c->batch, frame_bound(), c->max_frame);
	/* --source-ips: split in place */
	for (tok = c->src ? strtok_r(c->src, ",", &save) : NULL; tok;
	     tok = strtok_r(NULL, ",", &save)) {
		struct in6_addr a6;

		if (inet_pton(AF_INET, tok, &a6) != 1 && inet_pton(AF_INET6, tok, &a6) != 1)
			opts_die("--source-ips: '%s' is not an IP address", tok);
		c->src_ips = hub_xrealloc(c->src_ips, (c->n_src_ips + 1) * sizeof(char *));
		c->src_ips[c->n_src_ips++] = tok;
	}
	if (c->src && !c->n_src_ips)
		opts_die("--source-ips: empty list");
}

/* ------------------------------------------------------------------------ */
/* tokens                                                                     */

/* tmpl[0..n) with every {sub} replaced by sub (an id, so shell-safe) */
static char *subst(const char *tmpl, size_t n, const char *sub)
{
	hub_buf b = { 0 };

	hub_buf_reserve(&b, n);
	for (size_t i = 0; i < n;) {
		if (n - i >= 5 && !memcmp(tmpl + i, "{sub}", 5)) {
			hub_buf_puts(&b, sub);
			i += 5;
		} else {
			hub_buf_append(&b, tmpl + i++, 1);
		}
	}
	return b.data;
}

static char *make_auth(const char *token)
{
	hub_buf b = { 0 };

	hub_buf_printf(&b, "Bearer %s", token);
	return b.data;
}

/* start --token-cmd for one gateway; returns the pipe or NULL */
static FILE *token_cmd_start(const char *tmpl, const char *sub)
{
	char *cmd = subst(tmpl, strlen(tmpl), sub);
	FILE *f = popen(cmd, "r");

	free(cmd);
	if (!f)
		fprintf(stderr, "gw-sim: --token-cmd: cannot run: %s\n", strerror(errno));
	return f;
}

/* one token: not empty, no spaces or control characters */
static int token_ok(const char *t)
{
	if (!*t)
		return 0;
	for (; *t; t++)
		if (*t <= ' ' || *t == 0x7f)
			return 0;
	return 1;
}

/* read and reap a --token-cmd; returns "Bearer <token>" or NULL */
static char *token_cmd_finish(FILE *f, const char *sub)
{
	size_t n = 0, r;
	char *out = hub_xmalloc(SIM_TOKEN_MAX + 1), *p, *a = NULL;
	int st;

	while (n < SIM_TOKEN_MAX && (r = fread(out + n, 1, SIM_TOKEN_MAX - n, f)))
		n += r;
	while (fgetc(f) != EOF)     /* drain so the child never blocks */
		n = SIM_TOKEN_MAX + 1;
	st = pclose(f);
	if (n > SIM_TOKEN_MAX) {
		fprintf(stderr, "gw-sim: --token-cmd for %s: output over %u bytes\n", sub,
			SIM_TOKEN_MAX);
		goto out;
	}
	if (st == -1 || !WIFEXITED(st) || WEXITSTATUS(st)) {
		fprintf(stderr, "gw-sim: --token-cmd for %s: command failed (status %d)\n",
			sub, st == -1 ? -1 : WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
		goto out;
	}
	out[n] = '\0';
	while (n && isspace((unsigned char)out[n - 1]))
		out[--n] = '\0';
	for (p = out; isspace((unsigned char)*p); p++)
		;
	if (token_ok(p))
		a = make_auth(p);
	else
		fprintf(stderr, "gw-sim: --token-cmd for %s: output is not one token (empty, "
			"or contains spaces/control characters)\n", sub);
out:
	free(out);
	return a;
}

/* the devices claim for gateway sub: --jwt-devices split on ',' */
static json_t *devices_claim(const char *list, const char *sub)
{
	json_t *a = json_array();
	const char *p = list ? list : "*";

	for (;;) {
		size_t n = strcspn(p, ",");
		char *pat = subst(p, n, sub);

		if (pat && *pat)
			json_array_append_new(a, json_string(pat));
		free(pat);
		if (!p[n])
			return a;
		p += n + 1;
	}
}

/*
 * --jwt-secret: HS256 tokens minted in-process by libjwt, a few microseconds
 * each instead of a process spawn per gateway: claims sub, iat, exp = iat +
 * --ttl, devices (--jwt-devices, default ["*"]), what `iot-token jwt --alg
 * HS256` prints. The secret is the file's bytes less trailing CR/LF (the
 * hub's rule), at least 16 of them.
 */
static int mint_local(void)
{
	int64_t t0 = hub_mono_us(), iat = (int64_t)time(NULL), exp = iat + (int64_t)g.cfg.ttl;
	size_t klen = 0;
	char *key = hub_read_file(g.cfg.jwt_secret, 64 * 1024, &klen);

	if (!key) {
		fprintf(stderr, "gw-sim: --jwt-secret %s: %s\n", g.cfg.jwt_secret,
			errno == EFBIG ? "over 64 KiB" : strerror(errno));
		exit(1);
	}
	while (klen && (key[klen - 1] == '\n' || key[klen - 1] == '\r'))
		klen--;
	if (klen < 16) {
		fprintf(stderr, "gw-sim: --jwt-secret %s: HS256 secret is %zu bytes; the hub "
			"requires at least 16\n", g.cfg.jwt_secret, klen);
		exit(1);
	}
	for (unsigned i = 0; i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];
		json_t *claims = json_pack("{s:s, s:I, s:I, s:o}", "sub", gw->id,
					   "iat", (json_int_t)iat, "exp", (json_int_t)exp,
					   "devices", devices_claim(g.cfg.jwt_devices, gw->id));
		char *body = json_dumps(claims, JSON_COMPACT), *tok = NULL;
		jwt_t *j = NULL;

		json_decref(claims);
		if (body && !jwt_new(&j) && !jwt_add_grants_json(j, body) &&
		    !jwt_set_alg(j, JWT_ALG_HS256, (unsigned char *)key, (int)klen))
			tok = jwt_encode_str(j);
		jwt_free(j);
		free(body);
		if (!tok) {
			fprintf(stderr, "gw-sim: --jwt-secret: libjwt could not sign a token\n");
			free(key);
			return -1;
		}
		gw->auth = make_auth(tok);
		gw->auth_owned = 1;
		free(tok);
	}
	free(key);
	LOG(LOG_INFO, "tokens: %u minted in %.1f ms", g.cfg.gateways,
	    (double)(hub_mono_us() - t0) / 1e3);
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
static int mint_tokens(void)
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

static int setup_gateways(void)
{
	struct sim_cfg *c = &g.cfg;
	uint64_t seq0;
	unsigned i, d;
	int rc = 0;

	g.gws = hub_xcalloc(c->gateways, sizeof(*g.gws));
	g.temps = hub_xcalloc((size_t)c->gateways * c->devices + 1, sizeof(float));
	if (c->truth) {
		g.truth = fopen(c->truth, "w");
		if (!g.truth) {
			LOG(LOG_ERR, "--truth %s: %s", c->truth, strerror(errno));
			return -1;
		}
		g.injs = hub_xcalloc((size_t)c->gateways * c->devices + 1, sizeof(*g.injs));
		g.truth_ts0 = hub_now_ms() - (int64_t)g.cfg.truth_ago_ms;
	}
	g.hums = hub_xcalloc((size_t)c->gateways * c->devices + 1, sizeof(float));
	g.connq = hub_xcalloc(c->gateways, sizeof(*g.connq));
	g.heap = hub_xcalloc(c->gateways, sizeof(*g.heap));
	seq0 = c->seq_start_set ? c->seq_start : (uint64_t)hub_now_us();
	if (c->token)
		g.shared_auth = make_auth(c->token);

	for (i = 0; i < c->gateways; i++) {
		struct gw *gw = &g.gws[i];

		gw->idx = i;
		gw->heap_pos = -1;
		snprintf(gw->id, sizeof(gw->id), "%s-%04u", c->gw_prefix, i);
		gw->win = hub_xcalloc(c->inflight, sizeof(*gw->win));
		/* disjoint seq ranges: gateways that share a sub (one --token)
		 * must not have their frames deduplicated against each other */
		gw->next_seq = gw->base_seq = gw->send_cursor =
			seq0 + (uint64_t)i * SIM_SEQ_STRIDE;
		gw->temp = g.temps + (size_t)i * c->devices;
		gw->hum = g.hums + (size_t)i * c->devices;
		if (g.injs)
			gw->inj = g.injs + (size_t)i * c->devices;
		gw->dev_cursor = c->devices ? (unsigned)(rng_next() % c->devices)
					    : 0;
		for (d = 0; d < c->devices; d++) {
			gw->temp[d] = (float)(18.0 + 6.0 * rng_unit());
			gw->hum[d] = (float)(35.0 + 20.0 * rng_unit());
		}
		if (c->token)
			gw->auth = g.shared_auth;
	}
	if (c->token_cmd)
		rc = mint_tokens();
	else if (c->jwt_secret)
		rc = mint_local();
	return rc;
}

static void free_all(void)
{
	unsigned i, k;

	for (i = 0; g.gws && i < g.cfg.gateways; i++) {
		struct gw *gw = &g.gws[i];

		for (k = 0; gw->win && k < g.cfg.inflight; k++)
			free(gw->win[k].buf);
		free(gw->win);
		hub_buf_free(&gw->mqtt_rx);
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
	free(g.injs);
	if (g.truth)
		fclose(g.truth);
	free(g.hums);
	free(g.connq);
	free(g.heap);
	free(g.shared_auth);
	free(g.dev_type_json);
	free(g.labels_json);
	free(g.cfg.src_ips);
	hc_url_free(&g.cfg.u);
	opts_free(sim_opts, NOPTS, &g.cfg);
}

int main(int argc, char **argv)
{
	struct hc_ctx_opts xo = { .libev = 1, .rx_buffer = 1024, .signals = 1,
				  .on_signal = on_signal };
	char err[300];
	unsigned i;

	lg_init("gw-sim");
	lg_parse(sim_opts, NOPTS, &g.cfg, argc, argv, "usage: gw-sim [options]\n"
		 "Simulates gateways against an iot-hub /v1/gateway endpoint "
		 "(docs/simulator.md).\n");
	check_args();
	g.rng = g.cfg.seed ? g.cfg.seed :
		((uint64_t)hub_now_us() ^ ((uint64_t)getpid() << 32));
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

	if (g.cfg.sdk) {
		int rc = sdk_run();

		print_summary();
		free_all();
		return rc;
	}
	lg_lws_logs();
	xo.tls = g.cfg.u.tls;
	xo.ca_file = g.cfg.ca;
	xo.cert_file = g.cfg.cert;
	xo.key_file = g.cfg.key;
	g.x = hc_ctx_new(&xo, err, sizeof(err));
	if (!g.x) {
		fprintf(stderr, "gw-sim: %s\n", err);
		free_all();
		return 1;
	}
	g.ctx = hc_lws(g.x);

	LOG(LOG_INFO, "%u gateway(s) x %u device(s) -> %s (%s loop%s)",
	    g.cfg.gateways, g.cfg.devices, g.cfg.url,
	    g.cfg.idle ? "idle" : g.cfg.rate > 0 ? "open" : "closed",
	    g.cfg.n_src_ips ? ", bound source addresses" : "");

	g.start_us = g.last_stats_us = hub_mono_us();
	lg_bucket_init(&g.conn_bucket, g.cfg.connect_rate, g.start_us);
	for (i = 0; i < g.cfg.gateways; i++)
		gw_enqueue_connect(&g.gws[i]);
	if (g.cfg.stats_interval > 0)
		lg_stats_start(g.x, g.cfg.stats_interval, print_stats_line);
	if (g.cfg.duration > 0)
		lws_sul_schedule(g.ctx, 0, &g.sul_duration, duration_cb,
				 (lws_usec_t)(g.cfg.duration * 1e6));
	if (g.cfg.ack_timeout > 0)
		lws_sul_schedule(g.ctx, 0, &g.sul_watchdog, watchdog_cb,
				 LWS_USEC_PER_SEC);
	if (g.cfg.mqtt)
		lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
				 SIM_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
	hc_run(g.x);
	g.ctx = NULL;

	if (g.cfg.stats_interval > 0)
		print_stats_line(hub_mono_us());
	print_summary();
	free_all();
	return 0;
}
