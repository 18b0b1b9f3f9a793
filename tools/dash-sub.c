/*
 * dash-sub: the dashboard-subscriber load client of the fan-out benchmark
 * (bench/fanout.sh, bench/run W4; docs/dashboard.md). It opens N WebSocket
 * connections to /v1/stream (subprotocol iot-dashboard.v1), authenticates each
 * with an API key (Authorization header, or a first `auth` message), sends one
 * `subscribe` per connection, and counts what arrives: `reading`s, `gap`s and
 * their `dropped` counts, other messages, errors. For each reading it computes
 * the delivery latency
 *     now (wall clock, µs) - the send stamp in data.<--stamp-field>
 * (gw-sim --stamp-field puts the wall-clock µs at which it generated the reading
 * there), falling back to the reading's `ts` (ms) when the field is absent, into a
 * log-bucketed histogram. After --duration seconds it closes every connection and
 * prints one JSON line; readings received in the first --warmup seconds are
 * counted apart and stay out of the rates and latencies. One process, one
 * thread, one client context (client.h, libev backend), like gw-sim.
 *
 * Messages are not parsed as JSON: the type, the stamp and `dropped` are found
 * with short memmem() scans (the hub's messages are compact, and in JSON text an
 * unescaped `"key":` can only be a key), so the client costs little per message.
 *
 * It connects to loopback addresses only. No reconnects: a connection that fails
 * or is closed by the hub is counted and stays closed (a benchmark result, not
 * something to hide).
 *
 * --mqtt measures a broker (Mosquitto) the same way: subprotocol mqtt, binary
 * MQTT 3.1.1 (the wire of gw-sim --mqtt, for the other direction): CONNECT
 * (clean session, client id dash-sub-<pid>-<n>, keepalive 60 s, a PINGREQ every
 * 30 s), SUBSCRIBE --topic at QoS 0, then every PUBLISH payload is a gateway's
 * telemetry frame; each reading in it ({"device":…,"ts":…,"data":{…}}) is
 * counted and timed exactly like a hub `reading`. CONNACK plays the part of
 * `authenticated`, SUBACK of `subscribed`.
 */

#define _GNU_SOURCE
#include "tools/loadgen.h"

#include <jansson.h>

#include <arpa/inet.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define DS_SUBPROTOCOL   "iot-dashboard.v1"
#define DS_MQTT_SUBPROTOCOL "mqtt"
#define DS_MQTT_KEEPALIVE_S 60     /* CONNECT keepalive; PINGREQ every half */
#define DS_MQTT_SUB_PID  1         /* the one SUBSCRIBE's packet id */
#define DS_CLOSE_GRACE_US 2000000  /* wait this long for closing handshakes */
#define DS_TYPE_SCAN     160       /* "type" is looked for in the first bytes */
#define DS_PIDS_MAX      8
#define DS_SETTLE_MAX_S  30        /* --settle waits at most this past --warmup */

/* ------------------------------------------------------------------------ */
/* configuration and state                                                    */

struct cfg {
	char *url;
	struct hc_url u;        /* from url */
	char *token;
	char *auth;             /* "Bearer <token>" for the upgrade, or NULL */
	int auth_message;       /* token in a first {"type":"auth"} message */
	unsigned connections;
	char *stream;
	char *device_type;
	char *devices;          /* comma-separated; {i} -> slice index */
	char *labels;           /* k=v,... */
	char *since;
	unsigned slices;        /* {i} = connection index mod slices */
	char *stamp_field;
	double duration, warmup, connect_rate, stats_interval;
	double settle;          /* --settle: < 0 off */
	uint64_t max_msg;
	char *pids_s;           /* --cpu-pids, split into pids */
	int pids[DS_PIDS_MAX];
	unsigned n_pids;
	int mqtt;               /* --mqtt: MQTT 3.1.1 subscriber to a broker */
	char *topic;            /* --topic: MQTT topic filter */
};

enum conn_state { C_IDLE, C_CONNECTING, C_AUTHING, C_OPEN, C_SUBSCRIBED,
		  C_GONE };

struct conn {
	unsigned idx;
	struct hc_conn *hc;
	enum conn_state state;
	unsigned sub_sent:1, auth_sent:1, kill:1, established:1;
	unsigned mqtt_ping:1, mqtt_bye:1;  /* --mqtt: PINGREQ owed, DISCONNECT sent */
	int close_code;
	hub_buf mqtt_rx;        /* --mqtt: the unfinished start of a packet */
	uint64_t readings_win;  /* readings received in the window */
};

struct counters {
	uint64_t readings, gaps, dropped, other, errors, bad_msgs;
	uint64_t publishes;     /* --mqtt: PUBLISH packets (readings are inside) */
	uint64_t no_stamp, from_ts, negative;
};

static struct {
	struct cfg c;
	struct hc_ctx *x;
	struct lws_context *ctx;   /* x's, for timers */
	struct conn *conns;
	size_t stamp_key_len;
	char stamp_key[80];     /* "NAME": */

	unsigned next_connect;
	struct lg_bucket connect_bucket;

	unsigned n_live, n_established, n_subscribed, n_sub_failed;
	unsigned subscribed_at_window, subscribed_at_end;
	uint64_t connects, connect_failures, auth_failures, disconnects;
	int closed_codes[8];
	uint64_t closed_code_n[8];
	unsigned n_closed_codes;

	struct counters warm, win, iv;   /* before the window, in it, interval */
	struct lg_hist h_win, h_iv;
	struct lg_codes errs;   /* error codes */

	int64_t start_us, win_start_us, win_end_us, last_stats_us;
	int64_t all_sub_us;     /* --settle: when every connection was subscribed */
	int in_window, stopping, closing, destroying;
	long pid_ticks0[DS_PIDS_MAX], pid_ticks1[DS_PIDS_MAX];
	struct rusage ru0, ru1;  /* at the window's start and end */

	lws_sorted_usec_list_t sul_connect, sul_window, sul_stop, sul_destroy,
			       sul_mqtt_ping;
} g;

/* ------------------------------------------------------------------------ */
/* message scanning                                                           */

/* value after key (e.g. "\"dropped\":") as a non-negative integer, or -1 */
static int64_t scan_int(const char *m, size_t n, const char *key, size_t klen)
{
	const char *p = memmem(m, n, key, klen), *e = m + n;
	int64_t v = 0;
	int digits = 0;

	if (!p)
		return -1;
	p += klen;
	while (p < e && *p == ' ')
		p++;
	while (p < e && *p >= '0' && *p <= '9' && digits < 19) {
		v = v * 10 + (*p++ - '0');
		digits++;
	}
	return digits ? v : -1;
}

/* string value after key (e.g. "\"code\":"): pointer and length, or NULL */
static const char *scan_str(const char *m, size_t n, const char *key, size_t klen, size_t *len)
{
	const char *p = memmem(m, n, key, klen), *e = m + n, *q;

	if (!p)
		return NULL;
	p += klen;
	while (p < e && *p == ' ')
		p++;
	if (p >= e || *p++ != '"')
		return NULL;
	for (q = p; q < e && *q != '"'; q++)
		if (*q == '\\' && q + 1 < e)
			q++;
	if (q >= e)
		return NULL;
	*len = (size_t)(q - p);
	return p;
}

static void count_errcode(const char *code, size_t len)
{
	lg_codes_add(&g.errs, code, len);
}

static struct counters *ctr(void)
{
	return g.in_window ? &g.win : &g.warm;
}

static void on_reading(struct conn *c, const char *m, size_t n)
{
	const char *data = memmem(m, n, "\"data\":", 7);
	int64_t now = hub_now_us(), stamp = -1, lat;
	struct counters *k = ctr();

	k->readings++;
	g.iv.readings++;
	if (g.in_window)
		c->readings_win++;
	if (data)
		stamp = scan_int(data, (size_t)(m + n - data), g.stamp_key,
				 g.stamp_key_len);
	if (stamp < 0) {
		/* no stamp: the reading's ts (ms), before "data" */
		int64_t ts = scan_int(m, data ? (size_t)(data - m) : n, "\"ts\":", 5);

		if (ts < 0) {
			k->no_stamp++;
			return;
		}
		stamp = ts * 1000;
		k->from_ts++;
	}
	lat = now - stamp;
	if (lat < 0) {        /* clocks: the stamp is "later" than now */
		k->negative++;
		lat = 0;
	}
	if (g.in_window)
		lg_hist_add(&g.h_win, (uint64_t)lat);
	lg_hist_add(&g.h_iv, (uint64_t)lat);
}

static void request_write(struct conn *c);

static void handle_msg(struct conn *c, const char *m, size_t n)
{
	size_t tl, l;
	const char *t = scan_str(m, n < DS_TYPE_SCAN ? n : DS_TYPE_SCAN,
				 "\"type\":", 7, &tl);
	const char *code;

	if (!t) {
		ctr()->bad_msgs++;
		LOG(LOG_WARN, "conn %u: message without a type: %.*s", c->idx,
		    (int)(n < 120 ? n : 120), m);
		return;
	}
#define IS(s) (tl == sizeof(s) - 1 && !memcmp(t, s, sizeof(s) - 1))
	if (IS("reading")) {
		on_reading(c, m, n);
	} else if (IS("gap")) {
		int64_t d = scan_int(m, n, "\"dropped\":", 10);

		ctr()->gaps++;
		g.iv.gaps++;
		if (d > 0) {
			ctr()->dropped += (uint64_t)d;
			g.iv.dropped += (uint64_t)d;
		}
	} else if (IS("subscribed")) {
		if (c->state == C_OPEN) {
			c->state = C_SUBSCRIBED;
			g.n_subscribed++;
		}
	} else if (IS("authenticated")) {
		if (c->state == C_AUTHING) {
			c->state = C_OPEN;
			request_write(c);
		}
	} else if (IS("error")) {
		ctr()->errors++;
		code = scan_str(m, n, "\"code\":", 7, &l);
		if (code)
			count_errcode(code, l);
		else
			count_errcode("(none)", 6);
		/* an error about our subscription (id "s") */
		if (c->state == C_OPEN && c->sub_sent &&
		    (code = scan_str(m, n, "\"id\":", 5, &l)) && l == 1 &&
		    *code == 's')
			g.n_sub_failed++;
		LOG(LOG_WARN, "conn %u: hub error: %.*s", c->idx,
		    (int)(n < 200 ? n : 200), m);
	} else {
		ctr()->other++;
		g.iv.other++;
	}
#undef IS
}

/* ------------------------------------------------------------------------ */
/* --mqtt: MQTT 3.1.1 over WebSocket                                          */

/* CONNECT: MQTT level 4, clean session, keepalive, client id
 * dash-sub-<pid>-<n> (at most 23 bytes, the length every broker must take) */
static size_t mqtt_build_connect(const struct conn *c, unsigned char *o)
{
	char id[32];
	size_t idl = (size_t)snprintf(id, sizeof(id), "dash-sub-%d-%u",
				      (int)getpid() % 10000000, c->idx);

	return lg_mqtt_connect(o, id, idl, DS_MQTT_KEEPALIVE_S);
}

/* SUBSCRIBE --topic at QoS 0 (room: --topic is at most 1024 bytes) */
static size_t mqtt_build_subscribe(unsigned char *o)
{
	size_t tl = strlen(g.c.topic), n = 0;

	o[n++] = 0x82;
	n += lg_mqtt_varint(o + n, 2 + 2 + tl + 1);
	o[n++] = 0;
	o[n++] = DS_MQTT_SUB_PID;
	o[n++] = (unsigned char)(tl >> 8);
	o[n++] = (unsigned char)(tl & 0xff);
	memcpy(o + n, g.c.topic, tl);
	n += tl;
	o[n++] = 0;   /* requested QoS 0 */
	return n;
}

/* A PUBLISH payload is a gateway's telemetry frame,
 * {"type":"telemetry","seq":…,"readings":[{"device":…,"ts":…,"data":{…}},…]}:
 * each reading is the span from one "device" key to the next. */
static void on_publish_payload(struct conn *c, const char *p, size_t n)
{
	const char *e = p + n, *r = memmem(p, n, "\"device\":", 9), *next;

	ctr()->publishes++;
	if (!r) {
		ctr()->bad_msgs++;
		LOG(LOG_WARN, "conn %u: PUBLISH without readings: %.*s", c->idx,
		    (int)(n < 120 ? n : 120), p);
		return;
	}
	while (r) {
		next = memmem(r + 9, (size_t)(e - r - 9), "\"device\":", 9);
		on_reading(c, r, (size_t)((next ? next : e) - r));
		r = next;
	}
}

static void mqtt_kill(struct conn *c)
{
	c->kill = 1;
	request_write(c);
}

/* one whole packet from the broker: its first byte and its body */
static void mqtt_packet(void *ctx, unsigned b0, const unsigned char *b, size_t n)
{
	struct conn *c = ctx;

	switch (b0 >> 4) {
	case 3: {   /* PUBLISH: topic, packet id if QoS > 0, payload */
		unsigned qos = (b0 >> 1) & 3;
		size_t off;

		if (n < 2)
			goto bad;
		off = 2 + (((size_t)b[0] << 8) | b[1]) + (qos ? 2 : 0);
		if (off > n)
			goto bad;
		/* a QoS 0 subscription gets QoS 0 whatever the publisher used;
		 * anything else is counted, never acknowledged */
		if (qos)
			ctr()->other++;
		on_publish_payload(c, (const char *)b + off, n - off);
		break;
	}
	case 2:     /* CONNACK: flags, return code */
		if (n < 2 || c->state != C_AUTHING)
			goto bad;
		if (b[1]) {
			ctr()->errors++;
			if (b[1] == 4 || b[1] == 5) {
				g.auth_failures++;
				count_errcode("connack_not_authorized", 22);
			} else
				count_errcode("connack_refused", 15);
			LOG(LOG_WARN, "conn %u: broker refused CONNECT (return code %u)",
			    c->idx, b[1]);
			mqtt_kill(c);
			return;
		}
		c->state = C_OPEN;
		request_write(c);
		break;
	case 9:     /* SUBACK: packet id, the granted QoS or 0x80 */
		if (n < 3 || c->state != C_OPEN || !c->sub_sent)
			goto bad;
		if (b[2] & 0x80) {
			ctr()->errors++;
			count_errcode("suback_failure", 14);
			g.n_sub_failed++;
			LOG(LOG_WARN, "conn %u: SUBSCRIBE %s refused", c->idx,
			    g.c.topic);
		} else {
			c->state = C_SUBSCRIBED;
			g.n_subscribed++;
		}
		break;
	case 13:    /* PINGRESP */
		break;
	default:
		ctr()->other++;
		g.iv.other++;
		break;
	}
	return;
bad:
	ctr()->bad_msgs++;
	LOG(LOG_WARN, "conn %u: unexpected or short MQTT packet (type %u, %zu "
	    "bytes)", c->idx, b0 >> 4, n);
}

static void mqtt_receive(struct conn *c, const unsigned char *in, size_t len)
{
	if (c->kill)
		return;
	if (lg_mqtt_feed(&c->mqtt_rx, in, len, g.c.max_msg, mqtt_packet, c)) {
		ctr()->bad_msgs++;
		LOG(LOG_WARN, "conn %u: MQTT stream broken (bad length, or a packet "
		    "over --max-msg): closing", c->idx);
		mqtt_kill(c);
	}
}

/* ------------------------------------------------------------------------ */
/* outgoing messages                                                          */

/* the subscribe message of connection c (--devices patterns with {i} as the
 * connection's slice index, zero-padded to the width of slices - 1) */
static json_t *subscribe_msg(const struct conn *c)
{
	json_t *f = json_object(), *m;
	char num[16];
	int w = snprintf(num, sizeof(num), "%u", g.c.slices - 1);
	const char *p;

	snprintf(num, sizeof(num), "%0*u", w, c->idx % g.c.slices);
	if (g.c.devices) {
		json_t *a = json_array();

		for (p = g.c.devices;; p++) {
			size_t n = strcspn(p, ",");
			hub_buf b = { 0 };

			for (size_t i = 0; i < n;)
				if (n - i >= 3 && !memcmp(p + i, "{i}", 3)) {
					hub_buf_puts(&b, num);
					i += 3;
				} else {
					hub_buf_append(&b, p + i++, 1);
				}
			if (n)
				json_array_append_new(a, json_stringn(b.data, b.len));
			hub_buf_free(&b);
			p += n;
			if (!*p)
				break;
		}
		json_object_set_new(f, "devices", a);
	}
	if (g.c.device_type)
		json_object_set_new(f, "device_type", json_string(g.c.device_type));
	if (g.c.labels) {
		json_t *l = json_object();

		for (p = g.c.labels;; p++) {
			size_t n = strcspn(p, ","), k = strcspn(p, "=");
			char *key = strndup(p, k);

			if (k < n && key)
				json_object_set_new(l, key, json_stringn(p + k + 1, n - k - 1));
			free(key);
			p += n;
			if (!*p)
				break;
		}
		json_object_set_new(f, "labels", l);
	}
	m = json_pack("{s:s, s:s, s:s, s:o}", "type", "subscribe", "id", "s", "stream",
		      g.c.stream, "filter", f);
	if (g.c.since)
		json_object_set_new(m, "since", json_string(g.c.since));
	return m;
}

/* ------------------------------------------------------------------------ */
/* connections                                                                */

static void destroy_cb(lws_sorted_usec_list_t *sul);

static void request_write(struct conn *c)
{
	if (c->hc && c->established)
		hc_want_write(c->hc);
}

static void close_code_count(int code)
{
	unsigned i;

	for (i = 0; i < g.n_closed_codes; i++)
		if (g.closed_codes[i] == code) {
			g.closed_code_n[i]++;
			return;
		}
	if (g.n_closed_codes < 8) {
		g.closed_codes[g.n_closed_codes] = code;
		g.closed_code_n[g.n_closed_codes++] = 1;
	}
}

static void conn_gone(struct conn *c)
{
	if (c->state == C_GONE || c->state == C_IDLE)
		return;
	if (c->state == C_SUBSCRIBED)
		g.n_subscribed--;
	if (c->established) {
		g.n_established--;
		if (!g.stopping) {
			g.disconnects++;
			close_code_count(c->close_code);
			LOG(LOG_WARN, "conn %u: lost (close code %d)", c->idx,
			    c->close_code);
		}
	}
	c->state = C_GONE;
	c->hc = NULL;
	c->established = 0;
	g.n_live--;
	if (g.stopping && !g.n_live && !g.destroying)
		lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb, 0);
}

static const struct hc_cbs conn_cbs;

static void conn_start(struct conn *c)
{
	const struct hc_conn_opts co = {
		.url = &g.c.u, .subprotocol = g.c.mqtt ? DS_MQTT_SUBPROTOCOL : DS_SUBPROTOCOL,
		.auth = g.c.auth, .max_message = g.c.max_msg, .raw = g.c.mqtt,
		.cb = &conn_cbs, .user = c,
	};

	c->state = C_CONNECTING;
	g.n_live++;
	c->hc = hc_connect(g.x, &co);
	if (!c->hc) {   /* lws gave up at once: no callback comes */
		g.connect_failures++;
		conn_gone(c);
	}
}

static void connect_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	if (g.stopping)
		return;
	lg_bucket_refill(&g.connect_bucket, hub_mono_us());
	while (g.next_connect < g.c.connections && lg_bucket_take(&g.connect_bucket))
		conn_start(&g.conns[g.next_connect++]);
	if (g.next_connect < g.c.connections)
		lws_sul_schedule(g.ctx, 0, &g.sul_connect, connect_cb, 2000);
}

/* --mqtt: CONNECT, then (after CONNACK) SUBSCRIBE, then PINGREQs */
static void mqtt_writeable(struct conn *c)
{
	unsigned char *o = hc_txbuf(g.x, 64 + 1024);   /* --topic <= 1024 */
	size_t len;

	if (c->state == C_AUTHING && !c->auth_sent) {
		len = mqtt_build_connect(c, o);
		c->auth_sent = 1;
	} else if (c->state == C_OPEN && !c->sub_sent) {
		len = mqtt_build_subscribe(o);
		c->sub_sent = 1;
	} else if (c->mqtt_ping &&
		   (c->state == C_OPEN || c->state == C_SUBSCRIBED)) {
		o[0] = 0xc0;   /* PINGREQ */
		o[1] = 0;
		len = 2;
		c->mqtt_ping = 0;
	} else
		return;
	if (hc_write(c->hc, o, len, 1))
		LOG(LOG_WARN, "conn %u: write failed", c->idx);
	else if (c->mqtt_ping)
		hc_want_write(c->hc);
}

static void conn_writeable(struct hc_conn *hc, void *user)
{
	struct conn *c = user;
	json_t *m;
	char *s;

	if ((c->kill || g.stopping) && g.c.mqtt && !c->mqtt_bye &&
	    (c->state == C_OPEN || c->state == C_SUBSCRIBED)) {
		static const unsigned char bye[2] = { 0xe0, 0 };   /* DISCONNECT */

		c->mqtt_bye = 1;
		if (!hc_write(hc, bye, 2, 1))
			hc_want_write(hc);   /* the close next time */
		return;
	}
	if (c->kill || g.stopping) {
		hc_close(hc, LWS_CLOSE_STATUS_NORMAL, "done");
		return;
	}
	if (g.c.mqtt) {
		mqtt_writeable(c);
		return;
	}
	if (c->state == C_AUTHING && !c->auth_sent) {
		m = json_pack("{s:s, s:s}", "type", "auth", "token", g.c.token);
		c->auth_sent = 1;
	} else if (c->state == C_OPEN && !c->sub_sent) {
		m = subscribe_msg(c);
		c->sub_sent = 1;
	} else
		return;
	s = json_dumps(m, JSON_COMPACT);
	json_decref(m);
	if (!s || hc_write(hc, s, strlen(s), 0))
		LOG(LOG_WARN, "conn %u: write failed", c->idx);
	free(s);
}

static void conn_receive(struct hc_conn *hc, const char *m, size_t n, void *user)
{
	struct conn *c = user;

	if (g.c.mqtt) {
		mqtt_receive(c, (const unsigned char *)m, n);
	} else if (!m) {
		ctr()->bad_msgs++;
		LOG(LOG_WARN, "conn %u: message over --max-msg, dropped", c->idx);
	} else {
		handle_msg(c, m, n);
	}
}

static void conn_open(struct hc_conn *hc, void *user)
{
	struct conn *c = user;

	c->established = 1;
	g.n_established++;
	g.connects++;
	/* --mqtt: C_AUTHING until CONNACK */
	c->state = g.c.mqtt || (g.c.auth_message && g.c.token) ? C_AUTHING : C_OPEN;
	hc_want_write(hc);
}

static void conn_closed(struct hc_conn *hc, const struct hc_end *end, void *user)
{
	struct conn *c = user;

	if (end->error) {
		g.connect_failures++;
		if (end->status == 401 || end->status == 403)
			g.auth_failures++;
		LOG(LOG_WARN, "conn %u: connection failed: %s", c->idx, end->error);
	}
	c->close_code = end->close_code;
	conn_gone(c);
}

static const struct hc_cbs conn_cbs = { conn_open, conn_receive, conn_writeable, conn_closed };

/* ------------------------------------------------------------------------ */
/* timers                                                                     */

static long pid_ticks(int pid)
{
	char path[64], buf[1024], *p;
	unsigned long ut, st;
	FILE *f;
	size_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')');   /* comm may contain spaces */
	if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
			 &ut, &st) != 2)
		return -1;
	return (long)(ut + st);
}

static void stop_cb(lws_sorted_usec_list_t *sul);

static void window_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	if (sul && g.c.settle >= 0) {
		/* --settle: not before every connection has been subscribed for
		 * settle s (checked every 20 ms), not later than DS_SETTLE_MAX_S
		 * past --warmup; the window then lasts duration - warmup */
		int64_t now = hub_mono_us();

		if (!g.all_sub_us && g.next_connect == g.c.connections &&
		    g.n_live && g.n_subscribed == g.n_live)
			g.all_sub_us = now;
		if (now - g.start_us < (int64_t)((g.c.warmup + DS_SETTLE_MAX_S) * 1e6) &&
		    (!g.all_sub_us || now < g.all_sub_us + (int64_t)(g.c.settle * 1e6))) {
			lws_sul_schedule(g.ctx, 0, &g.sul_window, window_cb, 20000);
			return;
		}
		lws_sul_schedule(g.ctx, 0, &g.sul_stop, stop_cb,
				 (lws_usec_t)((g.c.duration - g.c.warmup) * 1e6));
	}
	for (i = 0; i < g.c.n_pids; i++)
		g.pid_ticks0[i] = pid_ticks(g.c.pids[i]);
	getrusage(RUSAGE_SELF, &g.ru0);
	g.win_start_us = hub_mono_us();
	g.in_window = 1;
	g.subscribed_at_window = g.n_subscribed;
	LOG(LOG_INFO, "window starts: %u of %u connections subscribed",
	    g.n_subscribed, g.c.connections);
}

/* --mqtt keepalive: a PINGREQ from every connection every 30 s (a broker
 * drops a client silent for 1.5 keepalives) */
static void mqtt_ping_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	(void)sul;
	if (g.stopping)
		return;
	for (i = 0; i < g.c.connections; i++) {
		struct conn *c = &g.conns[i];

		if (c->hc && c->established &&
		    (c->state == C_OPEN || c->state == C_SUBSCRIBED)) {
			c->mqtt_ping = 1;
			hc_want_write(c->hc);
		}
	}
	lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
			 DS_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
}

static void print_stats(int64_t now)
{
	double dt = (double)(now - g.last_stats_us) / 1e6;

	if (dt <= 0)
		dt = 1e-9;
	fprintf(stderr, "[%7.1fs] conn %u/%u subscribed %u | readings %.0f/s | "
		"gaps %" PRIu64 " dropped %" PRIu64 " | other %" PRIu64
		" | p50 %.2f p99 %.2f max %.2f ms\n",
		(double)(now - g.start_us) / 1e6, g.n_established,
		g.c.connections, g.n_subscribed, (double)g.iv.readings / dt,
		g.iv.gaps, g.iv.dropped, g.iv.other,
		(double)lg_hist_quantile(&g.h_iv, 0.5) / 1e3,
		(double)lg_hist_quantile(&g.h_iv, 0.99) / 1e3,
		(double)g.h_iv.max / 1e3);
	memset(&g.iv, 0, sizeof(g.iv));
	lg_hist_reset(&g.h_iv);
	g.last_stats_us = now;
}

static void destroy_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	if (g.destroying)
		return;
	g.destroying = 1;
	lws_sul_cancel(&g.sul_connect);
	lws_sul_cancel(&g.sul_window);
	lws_sul_cancel(&g.sul_stop);
	lg_stats_stop();
	lws_sul_cancel(&g.sul_mqtt_ping);
	hc_stop(g.x);
}

/* the window ends: freeze the figures, then close every connection */
static void stop_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	(void)sul;
	if (g.stopping)
		return;
	if (!g.in_window)
		window_cb(NULL);   /* stopped before the warmup ended */
	g.win_end_us = hub_mono_us();
	getrusage(RUSAGE_SELF, &g.ru1);
	g.subscribed_at_end = g.n_subscribed;
	for (i = 0; i < g.c.n_pids; i++)
		g.pid_ticks1[i] = pid_ticks(g.c.pids[i]);
	g.in_window = 0;
	g.stopping = 1;
	lws_sul_cancel(&g.sul_connect);
	lws_sul_cancel(&g.sul_mqtt_ping);
	lg_stats_stop();
	for (i = 0; i < g.c.connections; i++) {
		struct conn *c = &g.conns[i];

		if (c->hc && c->established)
			hc_want_write(c->hc);
		else if (c->hc)
			hc_close(c->hc, 0, NULL);
	}
	if (!g.n_live)
		lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb, 0);
	else
		lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb,
				 DS_CLOSE_GRACE_US);
}

/* SIGINT/SIGTERM: the first stops, the second closes at once */
static void on_signal(struct hc_ctx *x, int n)
{
	if (!g.stopping) {
		LOG(LOG_INFO, "signal: stopping");
		lws_sul_cancel(&g.sul_stop);
		stop_cb(NULL);
	} else {
		lws_sul_cancel(&g.sul_destroy);
		destroy_cb(NULL);
	}
}

/* ------------------------------------------------------------------------ */
/* summary                                                                    */

/* s as a JSON string on stdout */
static void print_jstr(const char *s)
{
	json_t *j = json_string(s);

	if (!j || json_dumpf(j, stdout, JSON_ENCODE_ANY))
		fputs("\"?\"", stdout);
	json_decref(j);
}

static void print_summary(void)
{
	double win = (double)(g.win_end_us - g.win_start_us) / 1e6;
	uint64_t pmin = UINT64_MAX, pmax = 0, psum = 0;
	struct rusage ru;
	long hz = sysconf(_SC_CLK_TCK);
	unsigned i, n, nsub = 0;

	if (win <= 0)
		win = 1e-9;
	for (i = 0; i < g.c.connections; i++) {
		uint64_t v = g.conns[i].readings_win;

		if (v < pmin)
			pmin = v;
		if (v > pmax)
			pmax = v;
		psum += v;
	}
	for (i = 0; i < g.c.connections; i++)
		nsub += g.conns[i].sub_sent;
	getrusage(RUSAGE_SELF, &ru);

	printf("{\"connections\":%u,\"connected_ok\":%" PRIu64 ",\"failed\":%" PRIu64
	       ",\"auth_failures\":%" PRIu64 ",\"subscribe_sent\":%u"
	       ",\"subscribed_at_window_start\":%u,\"subscribed_at_end\":%u"
	       ",\"subscribe_failed\":%u,\"disconnects\":%" PRIu64,
	       g.c.connections, g.connects, g.connect_failures, g.auth_failures,
	       nsub, g.subscribed_at_window, g.subscribed_at_end, g.n_sub_failed,
	       g.disconnects);
	printf(",\"close_codes\":{");
	for (i = 0; i < g.n_closed_codes; i++)
		printf("%s\"%d\":%" PRIu64, i ? "," : "", g.closed_codes[i],
		       g.closed_code_n[i]);
	printf("},\"protocol\":\"%s\"", g.c.mqtt ? DS_MQTT_SUBPROTOCOL :
	       DS_SUBPROTOCOL);
	if (g.c.mqtt) {
		printf(",\"topic\":");
		print_jstr(g.c.topic);
		printf(",\"publishes\":%" PRIu64, g.win.publishes);
	} else
		printf(",\"stream\":\"%s\"", g.c.stream);
	printf(",\"stamp_field\":\"%s\",\"warmup_s\":%.3f"
	       ",\"window_start_s\":%.3f,\"window_s\":%.3f", g.c.stamp_field,
	       g.c.warmup, (double)(g.win_start_us - g.start_us) / 1e6, win);
	printf(",\"messages\":%" PRIu64 ",\"msgs_per_s\":%.1f,\"gaps\":%" PRIu64
	       ",\"dropped\":%" PRIu64 ",\"other\":%" PRIu64 ",\"errors\":%" PRIu64
	       ",\"bad_messages\":%" PRIu64,
	       g.win.readings, (double)g.win.readings / win, g.win.gaps,
	       g.win.dropped, g.win.other, g.win.errors + g.warm.errors,
	       g.win.bad_msgs + g.warm.bad_msgs);
	printf(",\"warmup\":{\"messages\":%" PRIu64 ",\"gaps\":%" PRIu64
	       ",\"dropped\":%" PRIu64 ",\"errors\":%" PRIu64 "}",
	       g.warm.readings, g.warm.gaps, g.warm.dropped, g.warm.errors);
	printf(",\"error_codes\":{");
	for (i = 0, n = 0; i <= LG_CODES; i++)
		if (i < g.errs.len || (i == LG_CODES && g.errs.n[i]))
			printf("%s\"%s\":%" PRIu64, n++ ? "," : "", g.errs.name[i],
			       g.errs.n[i]);
	printf("},\"per_conn_messages\":{\"min\":%" PRIu64 ",\"max\":%" PRIu64
	       ",\"mean\":%.1f}", g.c.connections ? pmin : 0, pmax,
	       g.c.connections ? (double)psum / g.c.connections : 0.0);
	printf(",\"latency_ms\":{\"count\":%" PRIu64 ",\"p50\":%.3f,\"p90\":%.3f"
	       ",\"p99\":%.3f,\"p99.9\":%.3f,\"max\":%.3f,\"mean\":%.3f"
	       ",\"from_stamp\":%" PRIu64 ",\"from_ts\":%" PRIu64
	       ",\"no_stamp\":%" PRIu64 ",\"negative\":%" PRIu64 "}",
	       g.h_win.count, (double)lg_hist_quantile(&g.h_win, 0.5) / 1e3,
	       (double)lg_hist_quantile(&g.h_win, 0.9) / 1e3,
	       (double)lg_hist_quantile(&g.h_win, 0.99) / 1e3,
	       (double)lg_hist_quantile(&g.h_win, 0.999) / 1e3,
	       (double)g.h_win.max / 1e3, lg_hist_mean(&g.h_win) / 1e3,
	       g.h_win.count - g.win.from_ts, g.win.from_ts, g.win.no_stamp,
	       g.win.negative);
	printf(",\"cpu_s\":%.3f,\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f"
	       ",\"window_cpu_s\":%.3f,\"max_rss_kb\":%ld",
	       lg_tv_s(ru.ru_utime) + lg_tv_s(ru.ru_stime), lg_tv_s(ru.ru_utime),
	       lg_tv_s(ru.ru_stime),
	       lg_tv_s(g.ru1.ru_utime) + lg_tv_s(g.ru1.ru_stime) -
	       lg_tv_s(g.ru0.ru_utime) - lg_tv_s(g.ru0.ru_stime), ru.ru_maxrss);
	if (g.c.n_pids) {
		printf(",\"pid_cpu_s\":{");
		for (i = 0; i < g.c.n_pids; i++) {
			if (g.pid_ticks0[i] < 0 || g.pid_ticks1[i] < 0)
				printf("%s\"%d\":null", i ? "," : "", g.c.pids[i]);
			else
				printf("%s\"%d\":%.2f", i ? "," : "", g.c.pids[i],
				       (double)(g.pid_ticks1[i] - g.pid_ticks0[i]) /
				       (double)hz);
		}
		printf("}");
	}
	printf("}\n");
	fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* command line                                                               */

#define F(f) offsetof(struct cfg, f)

static const struct opt ds_opts[] = {
	{ "url", OPT_STR, F(url), "ws://127.0.0.1:8080/v1/stream", 0, 0,
	  "ws://HOST:PORT/v1/stream (a loopback address)", "URL" },
	{ "mqtt", OPT_FLAG, F(mqtt), NULL, 0, 0, "subscribe to an MQTT 3.1.1 broker over WebSocket "
	  "instead\n(subprotocol mqtt; --url ws://HOST:PORT/): each PUBLISH\npayload is a gateway "
	  "telemetry frame, each reading in\nit counted and timed; --stream and the filters do "
	  "not\napply" },
	{ "topic", OPT_STR, F(topic), NULL, 0, 0, "--mqtt topic filter, subscribed at QoS 0 "
	  "(default tele/#)", "FILTER" },
	{ "token", OPT_STR, F(token), NULL, 0, 0, "API key or JWT, sent as Authorization: Bearer "
	  "KEY", "KEY" },
	{ "auth-message", OPT_FLAG, F(auth_message), NULL, 0, 0, "send the token as a first "
	  "{\"type\":\"auth\"} message instead" },
	{ "connections", OPT_UINT, F(connections), "1", 1, 100000, "connections, one "
	  "subscription each", "N" },
	{ "connect-rate", OPT_DBL, F(connect_rate), "2000", 1, 1e6, "new connections per second",
	  "C" },
	{ "stream", OPT_STR, F(stream), "raw", 0, 0, "raw, 1s, 10s, 1m, presence, commands", "S" },
	{ "device-type", OPT_STR, F(device_type), NULL, 0, 0, "filter.device_type", "T" },
	{ "devices", OPT_STR, F(devices), NULL, 0, 0, "filter.devices: comma-separated ids or "
	  "prefixes ending in\n'*'; {i} is replaced by the connection's slice index\n(connection "
	  "number mod --slices, zero-padded to the\nwidth of slices-1), e.g. 'gw-0{i}*'", "LIST" },
	{ "slices", OPT_UINT, F(slices), NULL, 1, 1e9, "slice count for {i} (default: "
	  "--connections)", "K" },
	{ "labels", OPT_STR, F(labels), NULL, 0, 0, "filter.labels", "k=v,..." },
	{ "since", OPT_STR, F(since), NULL, 0, 0, "since (raw stream)", "POS" },
	{ "stamp-field", OPT_STR, F(stamp_field), "sent_us", 0, 0, "data field holding the send "
	  "time in Unix µs;\nreadings without it use ts (ms)", "NAME" },
	{ "duration", OPT_DBL, F(duration), "10", 0.1, 1e6, "stop after S seconds", "S" },
	{ "warmup", OPT_DBL, F(warmup), "0", 0, 1e6, "readings in the first S seconds are not "
	  "measured", "S" },
	{ "settle", OPT_DBL, F(settle), NULL, 0, 3600, "the window starts only S seconds after "
	  "every connection\nis subscribed (not before --warmup, at most 30 s after\nit) and "
	  "lasts duration - warmup seconds from there", "S" },
	{ "cpu-pids", OPT_STR, F(pids_s), NULL, 0, 0, "also report these processes' CPU seconds "
	  "(utime+stime\nfrom /proc) over the measured window", "P,P,..." },
	{ "max-msg", OPT_U64, F(max_msg), "1048576", 1024, 256 << 20, "largest message accepted",
	  "BYTES" },
	LG_OPTS(struct cfg, stats_interval),
};

#define NOPTS (sizeof(ds_opts) / sizeof(ds_opts[0]))

/* what the flags mean together */
static void check_args(void)
{
	struct cfg *c = &g.c;
	char err[256], *save = NULL, *t;
	struct in6_addr a6;
	int64_t pid;

	if (hc_url_parse(&c->u, c->url, HC_WS, err, sizeof(err)))
		opts_die("--url: %s", err);
	if (c->u.tls)
		opts_die("--url: must start with ws:// (loopback only), got '%s'", c->url);
	if (!strcmp(c->u.host, "localhost")) {
		free(c->u.host);
		c->u.host = hub_xstrdup("127.0.0.1");
	}
	if (inet_pton(AF_INET, c->u.host, &a6) == 1) {
		if (*(unsigned char *)&a6 != 127)
			opts_die("--url: %s is not a loopback address", c->u.host);
	} else if (inet_pton(AF_INET6, c->u.host, &a6) == 1) {
		if (!IN6_IS_ADDR_LOOPBACK(&a6))
			opts_die("--url: %s is not a loopback address", c->u.host);
	} else {
		opts_die("--url: host must be a loopback IP literal or localhost, got '%s'",
		       c->u.host);
	}
	if (!c->slices)
		c->slices = c->connections;
	if (c->warmup >= c->duration)
		opts_die("--warmup must be shorter than --duration");
	if (c->auth_message && !c->token)
		opts_die("--auth-message needs --token");
	if (c->topic && !c->mqtt)
		opts_die("--topic needs --mqtt");
	if (!c->topic)
		c->topic = hub_xstrdup("tele/#");
	if (!*c->topic || strlen(c->topic) > 1024)
		opts_die("--topic: 1 to 1024 bytes");
	if (c->mqtt && (c->auth_message || c->devices || c->device_type ||
			c->labels || c->since || strcmp(c->stream, "raw")))
		opts_die("--mqtt: --auth-message, --stream and the filters do "
		       "not apply (the broker's filter is --topic)");
	if (!*c->stamp_field || strlen(c->stamp_field) > 64 ||
	    strpbrk(c->stamp_field, "\"\\"))
		opts_die("--stamp-field: 1-64 characters, no quote or backslash");
	if (c->token && strpbrk(c->token, " \t\r\n"))
		opts_die("--token: no whitespace");
	if (c->token && !c->auth_message && !c->mqtt) {
		hub_buf b = { 0 };

		hub_buf_printf(&b, "Bearer %s", c->token);
		c->auth = b.data;
	}
	for (const char *p = c->labels; p; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) {
		size_t n = strcspn(p, ","), k = strcspn(p, "=");

		if (!k || k >= n)
			opts_die("--labels: expected k=v[,k=v...], got '%s'", c->labels);
	}
	for (t = c->pids_s ? strtok_r(c->pids_s, ",", &save) : NULL; t;
	     t = strtok_r(NULL, ",", &save)) {
		if (c->n_pids == DS_PIDS_MAX)
			opts_die("--cpu-pids: at most %d", DS_PIDS_MAX);
		if (hub_parse_i64(t, strlen(t), 1, 4194304, &pid))
			opts_die("--cpu-pids: expected a process id, got '%s'", t);
		c->pids[c->n_pids++] = (int)pid;
	}
	g.stamp_key_len = (size_t)snprintf(g.stamp_key, sizeof(g.stamp_key),
					   "\"%s\":", c->stamp_field);
}

int main(int argc, char **argv)
{
	struct hc_ctx_opts xo = { .libev = 1, .rx_buffer = 4096, .signals = 1,
				  .on_signal = on_signal };
	char err[300];
	unsigned i;

	lg_init("dash-sub");
	g.c.settle = -1;
	lg_parse(ds_opts, NOPTS, &g.c, argc, argv, "usage: dash-sub [options]\n"
		 "Opens N dashboard connections to an iot-hub /v1/stream endpoint, subscribes\n"
		 "each once, and measures what arrives: readings/s, gaps, and the latency from\n"
		 "the reading's send stamp (gw-sim --stamp-field) to its receipt. One JSON line\n"
		 "on stdout at the end. Loopback addresses only.\n\n");
	check_args();
	if (lg_raise_nofile("--connections", g.c.connections))
		exit(2);
	signal(SIGPIPE, SIG_IGN);

	g.conns = hub_xcalloc(g.c.connections, sizeof(*g.conns));
	for (i = 0; i < g.c.connections; i++)
		g.conns[i].idx = i;

	lg_lws_logs();
	g.x = hc_ctx_new(&xo, err, sizeof(err));
	if (!g.x) {
		fprintf(stderr, "dash-sub: %s\n", err);
		return 1;
	}
	g.ctx = hc_lws(g.x);

	g.start_us = g.last_stats_us = hub_mono_us();
	lg_bucket_init(&g.connect_bucket, g.c.connect_rate, g.start_us);
	lws_sul_schedule(g.ctx, 0, &g.sul_connect, connect_cb, 0);
	lws_sul_schedule(g.ctx, 0, &g.sul_window, window_cb,
			 (lws_usec_t)(g.c.warmup * 1e6));
	if (g.c.settle < 0)   /* else window_cb schedules the stop */
		lws_sul_schedule(g.ctx, 0, &g.sul_stop, stop_cb,
				 (lws_usec_t)(g.c.duration * 1e6));
	if (g.c.stats_interval > 0)
		lg_stats_start(g.x, g.c.stats_interval, print_stats);
	if (g.c.mqtt)
		lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
				 DS_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
	hc_run(g.x);
	g.ctx = NULL;
	if (g.c.stats_interval > 0)
		print_stats(hub_mono_us());
	print_summary();
	for (i = 0; i < g.c.connections; i++)
		hub_buf_free(&g.conns[i].mqtt_rx);
	free(g.conns);
	free(g.c.auth);
	hc_url_free(&g.c.u);
	opts_free(ds_opts, NOPTS, &g.c);
	return 0;
}
