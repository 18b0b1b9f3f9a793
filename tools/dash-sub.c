/*
 * dash-sub: dashboard-subscriber load client for iot-hub (the dashboard side of
 * CONTRACT.md §3, docs/dashboard.md), for the fan-out benchmark (bench/fanout.sh).
 *
 * One process, one thread, one lws client context on the libev backend (like
 * gw-sim). It opens N WebSocket connections to /v1/stream (subprotocol
 * iot-dashboard.v1), authenticates each with an API key (Authorization header,
 * or a first `auth` message), sends one `subscribe` per connection, and counts
 * what arrives: `reading`s, `gap`s and their `dropped` counts, other messages,
 * errors. For each reading it computes the delivery latency
 *     now (wall clock, µs) - the send stamp in data.<--stamp-field>
 * (gw-sim --stamp-field puts the wall-clock µs at which it generated the reading
 * there), falling back to the reading's `ts` (ms) when the field is absent, into a
 * log-bucketed histogram. After --duration seconds it closes every connection and
 * prints one JSON line; readings received in the first --warmup seconds are
 * counted apart and stay out of the rates and latencies.
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
 * MQTT 3.1.1 (the wire of gw-sim --mqtt, written again here for the other
 * direction): CONNECT (clean session, client id dash-sub-<pid>-<n>, keepalive
 * 60 s, a PINGREQ every 30 s), SUBSCRIBE --topic at QoS 0, then every PUBLISH
 * payload is a gateway's telemetry frame; each reading in it ({"device":…,
 * "ts":…,"data":{…}}) is counted and timed exactly like a hub `reading`.
 * CONNACK plays the part of `authenticated`, SUBACK of `subscribed`.
 *
 * lws 4.1.6 rules followed here (see gw-sim.c for how each was found):
 *  - CLIENT_RECEIVE always returns 0 (non-zero leaves the client parser's rx
 *    buffer position un-reset, and the next bytes overflow it); connections are
 *    closed from CLIENT_WRITEABLE.
 *  - lws_write() masks client payload in place: messages are built into the
 *    LWS_PRE-headed scratch buffer right before each write.
 *  - The libev glue re-arms its timer wrongly after socket events: a 10 ms
 *    heartbeat sul (lg_heartbeat_start, loadgen.h) keeps every timer within
 *    ~10 ms of its due time, and the first timers are kicked with
 *    lws_cancel_service().
 *  - WSI_DESTROY reaches protocols[0] once per wsi, also for connects that failed
 *    inside lws_client_connect_via_info(): the one "connection gone" hook.
 */

#define _GNU_SOURCE
#include "loadgen.h"

#include <arpa/inet.h>
#include <getopt.h>
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
#define DS_ERRCODES_MAX  16
#define DS_PIDS_MAX      8
#define DS_SETTLE_MAX_S  30        /* --settle waits at most this past --warmup */

/* ------------------------------------------------------------------------ */
/* lws logs                                                                   */

static void
lws_log_emit(int level, const char *line)
{
	(void)level;
	if (lg_log_level >= LOG_WARN)
		fprintf(stderr, "lws: %s", line);
}

/* ------------------------------------------------------------------------ */
/* configuration and state                                                    */

struct cfg {
	const char *url;
	struct lg_endpoint ep;  /* from url */
	const char *token;
	int auth_message;       /* token in a first {"type":"auth"} message */
	unsigned connections;
	const char *stream;
	const char *device_type;
	const char *devices;    /* comma-separated; {i} -> slice index */
	const char *labels;     /* k=v,... */
	const char *since;
	unsigned slices;        /* {i} = connection index mod slices */
	const char *stamp_field;
	double duration, warmup, connect_rate, stats_interval;
	double settle;          /* --settle: < 0 off */
	size_t max_msg;
	int pids[DS_PIDS_MAX];
	unsigned n_pids;
	int mqtt;               /* --mqtt: MQTT 3.1.1 subscriber to a broker */
	const char *topic;      /* --topic: MQTT topic filter */
};

enum conn_state { C_IDLE, C_CONNECTING, C_AUTHING, C_OPEN, C_SUBSCRIBED,
		  C_GONE };

struct conn {
	unsigned idx;
	struct lws *wsi;
	enum conn_state state;
	unsigned sub_sent:1, auth_sent:1, kill:1, rx_discard:1, established:1;
	unsigned mqtt_ping:1, mqtt_bye:1;  /* --mqtt: PINGREQ owed, DISCONNECT sent */
	int close_code;
	struct lg_rx rx;
	uint64_t readings_win;  /* readings received in the window */
};

struct counters {
	uint64_t readings, gaps, dropped, other, errors, bad_msgs;
	uint64_t publishes;     /* --mqtt: PUBLISH packets (readings are inside) */
	uint64_t no_stamp, from_ts, negative;
};

struct errcode {
	char name[32];
	uint64_t n;
};

static struct {
	struct cfg c;
	struct lws_context *ctx;
	struct conn *conns;
	unsigned char *tx;
	size_t tx_cap;
	size_t stamp_key_len, pad;
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
	struct errcode errs[DS_ERRCODES_MAX];
	unsigned n_errs;

	int64_t start_us, win_start_us, win_end_us, last_stats_us;
	int64_t all_sub_us;     /* --settle: when every connection was subscribed */
	int in_window, stopping, closing, destroying;
	int sig_seen;
	long pid_ticks0[DS_PIDS_MAX], pid_ticks1[DS_PIDS_MAX];
	struct rusage ru0, ru1;  /* at the window's start and end */

	lws_sorted_usec_list_t sul_connect, sul_window, sul_stop, sul_destroy,
			       sul_signal, sul_mqtt_ping;
} g;

/* ------------------------------------------------------------------------ */
/* message scanning                                                           */

/* value after key (e.g. "\"dropped\":") as a non-negative integer, or -1 */
static int64_t
scan_int(const char *m, size_t n, const char *key, size_t klen)
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
static const char *
scan_str(const char *m, size_t n, const char *key, size_t klen, size_t *len)
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

static void
count_errcode(const char *code, size_t len)
{
	unsigned i;

	if (len >= sizeof(g.errs[0].name))
		len = sizeof(g.errs[0].name) - 1;
	for (i = 0; i < g.n_errs; i++)
		if (strlen(g.errs[i].name) == len &&
		    !memcmp(g.errs[i].name, code, len)) {
			g.errs[i].n++;
			return;
		}
	if (g.n_errs == DS_ERRCODES_MAX)
		i = DS_ERRCODES_MAX - 1;   /* last slot collects the rest */
	else {
		i = g.n_errs++;
		memcpy(g.errs[i].name, code, len);
		g.errs[i].name[len] = '\0';
	}
	g.errs[i].n++;
}

static struct counters *
ctr(void)
{
	return g.in_window ? &g.win : &g.warm;
}

static void
on_reading(struct conn *c, const char *m, size_t n)
{
	const char *data = memmem(m, n, "\"data\":", 7);
	int64_t now = lg_wall_us(), stamp = -1, lat;
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

static void
handle_msg(struct conn *c, const char *m, size_t n)
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
static size_t
mqtt_build_connect(const struct conn *c, unsigned char *o)
{
	char id[32];
	size_t idl = (size_t)snprintf(id, sizeof(id), "dash-sub-%d-%u",
				      (int)getpid() % 10000000, c->idx);

	return lg_mqtt_connect(o, id, idl, DS_MQTT_KEEPALIVE_S);
}

/* SUBSCRIBE --topic at QoS 0 (room: --topic is at most 1024 bytes) */
static size_t
mqtt_build_subscribe(unsigned char *o)
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
static void
on_publish_payload(struct conn *c, const char *p, size_t n)
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

static void
mqtt_kill(struct conn *c)
{
	c->kill = 1;
	request_write(c);
}

/* one whole packet from the broker: its first byte and its body */
static void
mqtt_packet(struct conn *c, unsigned b0, const unsigned char *b, size_t n)
{
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

/* Handles the whole packets at the start of b; returns the bytes they took,
 * or (size_t)-1 when the stream cannot be followed (a length over 4 bytes or
 * a packet over --max-msg). */
static size_t
mqtt_packets(struct conn *c, const unsigned char *b, size_t n)
{
	size_t off = 0;

	while (n - off >= 2) {
		const unsigned char *p = b + off;
		size_t avail = n - off, rl = 0, h = 1;
		unsigned shift = 0;
		int whole = 0;

		while (h < avail && h <= 4) {
			rl |= (size_t)(p[h] & 0x7f) << shift;
			shift += 7;
			if (!(p[h++] & 0x80)) {
				whole = 1;
				break;
			}
		}
		if (!whole) {
			if (h > 4)
				return (size_t)-1;
			break;        /* the length goes on in the next message */
		}
		if (rl > g.c.max_msg)
			return (size_t)-1;
		if (avail - h < rl)
			break;        /* the body goes on in the next message */
		mqtt_packet(c, p[0], p + h, rl);
		off += h + rl;
	}
	return off;
}

static void
rx_keep(struct lg_rx *rx, const unsigned char *p, size_t n)
{
	if (rx->len + n > rx->cap) {
		size_t nc = rx->cap ? rx->cap : 1024;

		while (nc < rx->len + n)
			nc *= 2;
		rx->buf = lg_xrealloc(rx->buf, nc);
		rx->cap = nc;
	}
	memcpy(rx->buf + rx->len, p, n);
	rx->len += n;
}

/* MQTT packets may span or share WebSocket messages: a byte stream. Bytes
 * are parsed where they arrived; only a packet's unfinished start is kept. */
static void
mqtt_receive(struct conn *c, const unsigned char *in, size_t len)
{
	struct lg_rx *rx = &c->rx;
	const unsigned char *b = in;
	size_t n = len, used;

	if (c->kill)
		return;
	if (rx->len) {
		rx_keep(rx, in, len);
		b = (const unsigned char *)rx->buf;
		n = rx->len;
	}
	used = mqtt_packets(c, b, n);
	if (used == (size_t)-1) {
		ctr()->bad_msgs++;
		LOG(LOG_WARN, "conn %u: MQTT stream broken (bad length, or a packet "
		    "over --max-msg): closing", c->idx);
		rx->len = 0;
		mqtt_kill(c);
		return;
	}
	if (b != in) {
		memmove(rx->buf, rx->buf + used, n - used);
		rx->len = n - used;
	} else if (used < n)
		rx_keep(rx, in + used, n - used);
}

/* ------------------------------------------------------------------------ */
/* outgoing messages                                                          */

static void
ensure_tx(size_t n)
{
	if (g.tx_cap >= LWS_PRE + n)
		return;
	g.tx_cap = LWS_PRE + n;
	g.tx = lg_xrealloc(g.tx, g.tx_cap);
}

/* append s, JSON-escaped, as a string literal; returns new offset */
static size_t
put_jstr(char *o, size_t off, size_t cap, const char *s, size_t n)
{
	size_t i;

	if (off < cap)
		o[off] = '"';
	off++;
	for (i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];

		if (ch == '"' || ch == '\\') {
			if (off + 1 < cap) {
				o[off] = '\\';
				o[off + 1] = (char)ch;
			}
			off += 2;
		} else if (ch < 0x20) {
			if (off + 6 < cap)
				snprintf(o + off, 7, "\\u%04x", ch);
			off += 6;
		} else {
			if (off < cap)
				o[off] = (char)ch;
			off++;
		}
	}
	if (off < cap)
		o[off] = '"';
	return off + 1;
}

static size_t
put_raw(char *o, size_t off, size_t cap, const char *s)
{
	size_t n = strlen(s);

	if (off + n <= cap)
		memcpy(o + off, s, n);
	return off + n;
}

/* one devices pattern with {i} replaced by the connection's slice index,
 * zero-padded to the width of slices - 1 */
static size_t
put_pattern(char *o, size_t off, size_t cap, const char *p, size_t n,
	    unsigned idx)
{
	char buf[512], num[16];
	size_t k = 0, i = 0;
	int w = snprintf(num, sizeof(num), "%u", g.c.slices - 1);

	snprintf(num, sizeof(num), "%0*u", w, idx % g.c.slices);
	while (i < n && k < sizeof(buf) - 16) {
		if (n - i >= 3 && !memcmp(p + i, "{i}", 3)) {
			k += (size_t)snprintf(buf + k, sizeof(buf) - k, "%s", num);
			i += 3;
		} else
			buf[k++] = p[i++];
	}
	return put_jstr(o, off, cap, buf, k);
}

/* the subscribe message of connection c into o; returns its length (> cap:
 * did not fit) */
static size_t
build_subscribe(const struct conn *c, char *o, size_t cap)
{
	size_t off = 0;
	int nf = 0;

	off = put_raw(o, off, cap, "{\"type\":\"subscribe\",\"id\":\"s\",\"stream\":");
	off = put_jstr(o, off, cap, g.c.stream, strlen(g.c.stream));
	off = put_raw(o, off, cap, ",\"filter\":{");
	if (g.c.devices) {
		const char *p = g.c.devices;
		int first = 1;

		off = put_raw(o, off, cap, "\"devices\":[");
		for (;;) {
			const char *e = strchr(p, ',');
			size_t n = e ? (size_t)(e - p) : strlen(p);

			if (n) {
				if (!first)
					off = put_raw(o, off, cap, ",");
				off = put_pattern(o, off, cap, p, n, c->idx);
				first = 0;
			}
			if (!e)
				break;
			p = e + 1;
		}
		off = put_raw(o, off, cap, "]");
		nf++;
	}
	if (g.c.device_type) {
		off = put_raw(o, off, cap, nf ? "," : "");
		off = put_raw(o, off, cap, "\"device_type\":");
		off = put_jstr(o, off, cap, g.c.device_type,
			       strlen(g.c.device_type));
		nf++;
	}
	if (g.c.labels) {
		const char *p = g.c.labels;
		int first = 1;

		off = put_raw(o, off, cap, nf ? ",\"labels\":{" : "\"labels\":{");
		for (;;) {
			const char *e = strchr(p, ','), *eq;
			size_t n = e ? (size_t)(e - p) : strlen(p);

			eq = memchr(p, '=', n);
			if (eq) {
				if (!first)
					off = put_raw(o, off, cap, ",");
				off = put_jstr(o, off, cap, p, (size_t)(eq - p));
				off = put_raw(o, off, cap, ":");
				off = put_jstr(o, off, cap, eq + 1,
					       n - (size_t)(eq - p) - 1);
				first = 0;
			}
			if (!e)
				break;
			p = e + 1;
		}
		off = put_raw(o, off, cap, "}");
	}
	off = put_raw(o, off, cap, "}");
	if (g.c.since) {
		off = put_raw(o, off, cap, ",\"since\":");
		off = put_jstr(o, off, cap, g.c.since, strlen(g.c.since));
	}
	off = put_raw(o, off, cap, "}");
	return off;
}

static size_t
build_auth(char *o, size_t cap)
{
	size_t off = put_raw(o, 0, cap, "{\"type\":\"auth\",\"token\":");

	off = put_jstr(o, off, cap, g.c.token, strlen(g.c.token));
	return put_raw(o, off, cap, "}");
}

/* ------------------------------------------------------------------------ */
/* connections                                                                */

static void destroy_cb(lws_sorted_usec_list_t *sul);

static void
request_write(struct conn *c)
{
	if (c->wsi && c->established)
		lws_callback_on_writable(c->wsi);
}

static void
close_code_count(int code)
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

static void
conn_gone(struct conn *c)
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
	c->wsi = NULL;
	c->established = 0;
	g.n_live--;
	if (g.stopping && !g.n_live && !g.destroying)
		lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb, 0);
}

static void
conn_start(struct conn *c)
{
	struct lws_client_connect_info ci;

	lg_connect_info(&ci, g.ctx, &g.c.ep, g.c.mqtt ? DS_MQTT_SUBPROTOCOL :
			DS_SUBPROTOCOL, c, &c->wsi);
	c->state = C_CONNECTING;
	g.n_live++;
	if (!lws_client_connect_via_info(&ci) && c->state == C_CONNECTING) {
		/* lws gave up before any callback */
		g.connect_failures++;
		conn_gone(c);
	}
}

static void
connect_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	if (g.stopping)
		return;
	lg_bucket_refill(&g.connect_bucket, lg_mono_us());
	while (g.next_connect < g.c.connections &&
	       lg_bucket_take(&g.connect_bucket))
		conn_start(&g.conns[g.next_connect++]);
	if (g.next_connect < g.c.connections)
		lws_sul_schedule(g.ctx, 0, &g.sul_connect, connect_cb, 2000);
}

/* --mqtt: CONNECT, then (after CONNACK) SUBSCRIBE, then PINGREQs */
static int
mqtt_writeable(struct conn *c, struct lws *wsi)
{
	unsigned char *o;
	size_t len;

	ensure_tx(64 + 1024);   /* CONNECT or SUBSCRIBE (--topic <= 1024) */
	o = g.tx + LWS_PRE;
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
		return 0;
	if (lws_write(wsi, o, len, LWS_WRITE_BINARY) < (int)len) {
		LOG(LOG_WARN, "conn %u: write failed", c->idx);
		return -1;
	}
	if (c->mqtt_ping)
		lws_callback_on_writable(wsi);
	return 0;
}

static int
conn_writeable(struct conn *c, struct lws *wsi)
{
	size_t len, cap;
	char *p;

	if (c->kill || g.stopping) {
		if (g.c.mqtt && !c->mqtt_bye &&
		    (c->state == C_OPEN || c->state == C_SUBSCRIBED)) {
			unsigned char *o;

			ensure_tx(16);
			o = g.tx + LWS_PRE;
			o[0] = 0xe0;   /* DISCONNECT first, the close next time */
			o[1] = 0;
			c->mqtt_bye = 1;
			if (lws_write(wsi, o, 2, LWS_WRITE_BINARY) < 2)
				return -1;
			lws_callback_on_writable(wsi);
			return 0;
		}
		lws_close_reason(wsi, LWS_CLOSE_STATUS_NORMAL,
				 (unsigned char *)"done", 4);
		return -1;
	}
	if (g.c.mqtt)
		return mqtt_writeable(c, wsi);
	if (c->state == C_AUTHING && !c->auth_sent) {
		cap = strlen(g.c.token) * 2 + 64;
		ensure_tx(cap);
		p = (char *)g.tx + LWS_PRE;
		len = build_auth(p, cap);
		c->auth_sent = 1;
	} else if (c->state == C_OPEN && !c->sub_sent) {
		cap = 256;
		for (;;) {
			ensure_tx(cap);
			p = (char *)g.tx + LWS_PRE;
			len = build_subscribe(c, p, cap);
			if (len <= cap)
				break;
			cap = len;
		}
		c->sub_sent = 1;
	} else
		return 0;
	if (lws_write(wsi, (unsigned char *)p, len, LWS_WRITE_TEXT) < (int)len) {
		LOG(LOG_WARN, "conn %u: write failed", c->idx);
		return -1;
	}
	return 0;
}

/* always returns 0 (lws 4.1.6 client parser, see the top) */
static int
conn_receive(struct conn *c, struct lws *wsi, const char *in, size_t len)
{
	int final = lws_is_final_fragment(wsi), r;
	const char *m;
	size_t n;

	if (g.c.mqtt) {
		mqtt_receive(c, (const unsigned char *)in, len);
		return 0;
	}
	if (c->rx_discard) {
		if (final)
			c->rx_discard = 0;
		return 0;
	}
	r = lg_rx_feed(&c->rx, in, len, final, g.c.max_msg, &m, &n);
	if (r < 0) {
		ctr()->bad_msgs++;
		LOG(LOG_WARN, "conn %u: message over --max-msg, dropped", c->idx);
		c->rx_discard = !final;
	} else if (r)
		handle_msg(c, m, n);
	return 0;
}

static void signal_cb(lws_sorted_usec_list_t *sul);

static int
callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
	 void *in, size_t len)
{
	struct conn *c;

	(void)user;
	if (reason == LWS_CALLBACK_EVENT_WAIT_CANCELLED) {
		if (lg_signal_count() != g.sig_seen && g.ctx && !g.destroying)
			lws_sul_schedule(g.ctx, 0, &g.sul_signal, signal_cb, 0);
		return 0;
	}
	c = lg_client_owner(wsi, reason);
	if (!c || (c->wsi && c->wsi != wsi))
		return 0;

	switch (reason) {
	case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
		unsigned char **p = (unsigned char **)in, *end = *p + len;
		char auth[2048];
		int n;

		if (!g.c.token || g.c.auth_message || g.c.mqtt)
			break;
		n = snprintf(auth, sizeof(auth), "Bearer %s", g.c.token);
		if (n >= (int)sizeof(auth) ||
		    lws_add_http_header_by_name(wsi,
				(const unsigned char *)"authorization:",
				(const unsigned char *)auth, n, p, end)) {
			LOG(LOG_ERR, "token does not fit in the handshake");
			return -1;
		}
		break;
	}
	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR: {
		const char *why = in ? (const char *)in : "unknown";

		g.connect_failures++;
		if (strstr(why, "401") || strstr(why, "403") ||
		    strstr(why, "nauthori") || strstr(why, "orbidden"))
			g.auth_failures++;
		LOG(LOG_WARN, "conn %u: connection failed: %s", c->idx, why);
		break;
	}
	case LWS_CALLBACK_CLIENT_ESTABLISHED:
		c->wsi = wsi;
		c->established = 1;
		g.n_established++;
		g.connects++;
		/* --mqtt: C_AUTHING until CONNACK */
		c->state = g.c.mqtt || (g.c.auth_message && g.c.token) ?
			   C_AUTHING : C_OPEN;
		lws_callback_on_writable(wsi);
		break;
	case LWS_CALLBACK_CLIENT_RECEIVE:
		return conn_receive(c, wsi, in, len);
	case LWS_CALLBACK_CLIENT_WRITEABLE:
		return conn_writeable(c, wsi);
	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
		if (len >= 2) {
			const unsigned char *b = in;

			c->close_code = (b[0] << 8) | b[1];
		}
		break;
	case LWS_CALLBACK_WSI_DESTROY:
		conn_gone(c);
		break;
	default:
		break;
	}
	return 0;
}

static const struct lws_protocols protocols[] = {
	{ DS_SUBPROTOCOL, callback, 0, 4096, 0, NULL, 0 },
	{ DS_MQTT_SUBPROTOCOL, callback, 0, 4096, 0, NULL, 0 },
	{ NULL, NULL, 0, 0, 0, NULL, 0 }
};

/* ------------------------------------------------------------------------ */
/* timers                                                                     */

static long
pid_ticks(int pid)
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

static void
window_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	if (sul && g.c.settle >= 0) {
		/* --settle: not before every connection has been subscribed for
		 * settle s (checked every 20 ms), not later than DS_SETTLE_MAX_S
		 * past --warmup; the window then lasts duration - warmup */
		int64_t now = lg_mono_us();

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
	g.win_start_us = lg_mono_us();
	g.in_window = 1;
	g.subscribed_at_window = g.n_subscribed;
	LOG(LOG_INFO, "window starts: %u of %u connections subscribed",
	    g.n_subscribed, g.c.connections);
}

/* --mqtt keepalive: a PINGREQ from every connection every 30 s (a broker
 * drops a client silent for 1.5 keepalives) */
static void
mqtt_ping_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	(void)sul;
	if (g.stopping)
		return;
	for (i = 0; i < g.c.connections; i++) {
		struct conn *c = &g.conns[i];

		if (c->wsi && c->established &&
		    (c->state == C_OPEN || c->state == C_SUBSCRIBED)) {
			c->mqtt_ping = 1;
			lws_callback_on_writable(c->wsi);
		}
	}
	lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
			 DS_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
}

static void
print_stats(int64_t now)
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

static void
destroy_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	if (g.destroying)
		return;
	g.destroying = 1;
	lws_sul_cancel(&g.sul_connect);
	lg_heartbeat_stop();
	lws_sul_cancel(&g.sul_window);
	lws_sul_cancel(&g.sul_stop);
	lg_stats_stop();
	lws_sul_cancel(&g.sul_signal);
	lws_sul_cancel(&g.sul_mqtt_ping);
	lws_context_destroy(g.ctx);   /* deferred until the loop unwinds */
}

/* the window ends: freeze the figures, then close every connection */
static void
stop_cb(lws_sorted_usec_list_t *sul)
{
	unsigned i;

	(void)sul;
	if (g.stopping)
		return;
	if (!g.in_window)
		window_cb(NULL);   /* stopped before the warmup ended */
	g.win_end_us = lg_mono_us();
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

		if (!c->wsi)
			continue;
		if (c->established)
			lws_callback_on_writable(c->wsi);
		else
			lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK,
					LWS_TO_KILL_ASYNC);
	}
	if (!g.n_live)
		lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb, 0);
	else
		lws_sul_schedule(g.ctx, 0, &g.sul_destroy, destroy_cb,
				 DS_CLOSE_GRACE_US);
}

static void
signal_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	if (lg_signal_count() == g.sig_seen)
		return;
	g.sig_seen = lg_signal_count();
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
static void
print_jstr(const char *s)
{
	char buf[2 * 1024 + 16];
	size_t n = put_jstr(buf, 0, sizeof(buf), s, strlen(s));

	if (n <= sizeof(buf))
		fwrite(buf, 1, n, stdout);
	else
		fputs("\"?\"", stdout);
}

static void
print_summary(void)
{
	double win = (double)(g.win_end_us - g.win_start_us) / 1e6;
	uint64_t pmin = UINT64_MAX, pmax = 0, psum = 0;
	struct rusage ru;
	long hz = sysconf(_SC_CLK_TCK);
	unsigned i, nsub = 0;

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
	for (i = 0; i < g.n_errs; i++)
		printf("%s\"%s\":%" PRIu64, i ? "," : "", g.errs[i].name,
		       g.errs[i].n);
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

static void
usage(FILE *f)
{
	fprintf(f,
"usage: dash-sub [options]\n"
"Opens N dashboard connections to an iot-hub /v1/stream endpoint, subscribes\n"
"each once, and measures what arrives: readings/s, gaps, and the latency from\n"
"the reading's send stamp (gw-sim --stamp-field) to its receipt. One JSON line\n"
"on stdout at the end. Loopback addresses only.\n"
"\n"
"  --url URL            ws://HOST:PORT/v1/stream (default ws://127.0.0.1:8080/v1/stream)\n"
"  --mqtt               subscribe to an MQTT 3.1.1 broker over WebSocket instead\n"
"                       (subprotocol mqtt; --url ws://HOST:PORT/): each PUBLISH\n"
"                       payload is a gateway telemetry frame, each reading in\n"
"                       it counted and timed; --stream and the filters do not\n"
"                       apply\n"
"  --topic FILTER       --mqtt topic filter, subscribed at QoS 0 (default tele/#)\n"
"  --token KEY          API key or JWT, sent as Authorization: Bearer KEY\n"
"  --auth-message       send the token as a first {\"type\":\"auth\"} message instead\n"
"  --connections N      connections, one subscription each (default 1)\n"
"  --connect-rate C     new connections per second (default 2000)\n"
"  --stream S           raw, 1s, 10s, 1m, presence, commands (default raw)\n"
"  --device-type T      filter.device_type\n"
"  --devices LIST       filter.devices: comma-separated ids or prefixes ending in\n"
"                       '*'; {i} is replaced by the connection's slice index\n"
"                       (connection number mod --slices, zero-padded to the\n"
"                       width of slices-1), e.g. 'gw-0{i}*'\n"
"  --slices K           slice count for {i} (default: --connections)\n"
"  --labels k=v,...     filter.labels\n"
"  --since POS          since (raw stream)\n"
"  --stamp-field NAME   data field holding the send time in Unix µs (default\n"
"                       sent_us); readings without it use ts (ms)\n"
"  --duration S         stop after S seconds (default 10)\n"
"  --warmup S           readings in the first S seconds are not measured (default 0)\n"
"  --settle S           the window starts only S seconds after every connection\n"
"                       is subscribed (not before --warmup, at most 30 s after\n"
"                       it) and lasts duration - warmup seconds from there\n"
"  --cpu-pids P,P,...   also report these processes' CPU seconds (utime+stime\n"
"                       from /proc) over the measured window\n"
"  --max-msg BYTES      largest message accepted (default 1048576)\n"
"  --stats-interval S   one stats line per S seconds on stderr (default 0 = off)\n"
"  -v, -q, -h           more logs / errors only / this help\n");
}

/* ws://host[:port][/path]; the host must be a loopback address */
static void
parse_url(struct cfg *c)
{
	struct lg_endpoint *ep = &c->ep;
	const char *h, *e, *pe;
	struct in_addr a4;
	struct in6_addr a6;

	if (strncmp(c->url, "ws://", 5))
		lg_die_flag("--url: must start with ws:// (loopback only), got '%s'",
			    c->url);
	h = c->url + 5;
	pe = h + strcspn(h, "/?#");
	ep->host = lg_url_host(c->url, h, pe, &e);
	if (!strcmp(ep->host, "localhost")) {
		free(ep->host);
		ep->host = lg_xstrdup("127.0.0.1");
	}
	if (inet_pton(AF_INET, ep->host, &a4) == 1) {
		if ((ntohl(a4.s_addr) >> 24) != 127)
			lg_die_flag("--url: %s is not a loopback address", ep->host);
	} else if (inet_pton(AF_INET6, ep->host, &a6) == 1) {
		if (!IN6_IS_ADDR_LOOPBACK(&a6))
			lg_die_flag("--url: %s is not a loopback address", ep->host);
	} else
		lg_die_flag("--url: host must be a loopback IP literal or "
			    "localhost, got '%s'", ep->host);
	ep->port = 80;
	if (*e == ':') {
		char *ps = strndup(e + 1, (size_t)(pe - e - 1));

		if (!ps)
			abort();
		ep->port = (int)lg_parse_num("--url port", ps, 1, 65535);
		free(ps);
	} else if (e != pe)
		lg_die_flag("--url: bad host part in '%s'", c->url);
	ep->path = lg_xstrdup(*pe == '/' ? pe : "/");
	ep->host_hdr = lg_host_header(ep->host, ep->port);
}

static void
parse_args(int argc, char **argv)
{
	enum { O_URL = 256, O_TOKEN, O_AUTHMSG, O_CONNS, O_CRATE, O_STREAM,
	       O_DTYPE, O_DEVICES, O_SLICES, O_LABELS, O_SINCE, O_STAMP, O_DUR,
	       O_WARMUP, O_PIDS, O_MAXMSG, O_STATS, O_MQTT, O_TOPIC, O_SETTLE };
	static const struct option opts[] = {
		{ "url", required_argument, NULL, O_URL },
		{ "token", required_argument, NULL, O_TOKEN },
		{ "auth-message", no_argument, NULL, O_AUTHMSG },
		{ "connections", required_argument, NULL, O_CONNS },
		{ "connect-rate", required_argument, NULL, O_CRATE },
		{ "stream", required_argument, NULL, O_STREAM },
		{ "device-type", required_argument, NULL, O_DTYPE },
		{ "devices", required_argument, NULL, O_DEVICES },
		{ "slices", required_argument, NULL, O_SLICES },
		{ "labels", required_argument, NULL, O_LABELS },
		{ "since", required_argument, NULL, O_SINCE },
		{ "stamp-field", required_argument, NULL, O_STAMP },
		{ "duration", required_argument, NULL, O_DUR },
		{ "warmup", required_argument, NULL, O_WARMUP },
		{ "settle", required_argument, NULL, O_SETTLE },
		{ "cpu-pids", required_argument, NULL, O_PIDS },
		{ "max-msg", required_argument, NULL, O_MAXMSG },
		{ "stats-interval", required_argument, NULL, O_STATS },
		{ "mqtt", no_argument, NULL, O_MQTT },
		{ "topic", required_argument, NULL, O_TOPIC },
		{ "verbose", no_argument, NULL, 'v' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct cfg *c = &g.c;
	const char *pids = NULL;
	int o;

	c->url = "ws://127.0.0.1:8080/v1/stream";
	c->connections = 1;
	c->connect_rate = 2000;
	c->stream = "raw";
	c->stamp_field = "sent_us";
	c->duration = 10;
	c->max_msg = 1u << 20;
	c->settle = -1;

	opterr = 0;
	while ((o = getopt_long(argc, argv, ":vqh", opts, NULL)) != -1) {
		switch (o) {
		case O_URL: c->url = optarg; break;
		case O_TOKEN: c->token = optarg; break;
		case O_AUTHMSG: c->auth_message = 1; break;
		case O_CONNS:
			c->connections = (unsigned)lg_parse_num(
				"--connections", optarg, 1, 100000);
			break;
		case O_CRATE:
			c->connect_rate = lg_parse_num("--connect-rate", optarg, 1, 1e6);
			break;
		case O_STREAM: c->stream = optarg; break;
		case O_DTYPE: c->device_type = optarg; break;
		case O_DEVICES: c->devices = optarg; break;
		case O_SLICES:
			c->slices = (unsigned)lg_parse_num("--slices", optarg, 1, 1e9);
			break;
		case O_LABELS: c->labels = optarg; break;
		case O_SINCE: c->since = optarg; break;
		case O_STAMP: c->stamp_field = optarg; break;
		case O_DUR:
			c->duration = lg_parse_num("--duration", optarg, 0.1, 1e6);
			break;
		case O_WARMUP:
			c->warmup = lg_parse_num("--warmup", optarg, 0, 1e6);
			break;
		case O_SETTLE:
			c->settle = lg_parse_num("--settle", optarg, 0, 3600);
			break;
		case O_PIDS: pids = optarg; break;
		case O_MAXMSG:
			c->max_msg = (size_t)lg_parse_num("--max-msg", optarg, 1024,
							  256 << 20);
			break;
		case O_STATS:
			c->stats_interval = lg_parse_stats_interval(optarg);
			break;
		case O_MQTT: c->mqtt = 1; break;
		case O_TOPIC: c->topic = optarg; break;
		default: lg_common_option(o, argv, usage);
		}
	}
	if (optind < argc)
		lg_die_flag("unexpected argument '%s'", argv[optind]);
	parse_url(c);
	if (!c->slices)
		c->slices = c->connections;
	if (c->warmup >= c->duration)
		lg_die_flag("--warmup must be shorter than --duration");
	if (c->auth_message && !c->token)
		lg_die_flag("--auth-message needs --token");
	if (c->topic && !c->mqtt)
		lg_die_flag("--topic needs --mqtt");
	if (!c->topic)
		c->topic = "tele/#";
	if (!*c->topic || strlen(c->topic) > 1024)
		lg_die_flag("--topic: 1 to 1024 bytes");
	if (c->mqtt && (c->auth_message || c->devices || c->device_type ||
			c->labels || c->since || strcmp(c->stream, "raw")))
		lg_die_flag("--mqtt: --auth-message, --stream and the filters do "
			    "not apply (the broker's filter is --topic)");
	if (!*c->stamp_field || strlen(c->stamp_field) > 64 ||
	    strpbrk(c->stamp_field, "\"\\"))
		lg_die_flag("--stamp-field: 1-64 characters, no quote or backslash");
	if (c->token && strpbrk(c->token, " \t\r\n"))
		lg_die_flag("--token: no whitespace");
	if (c->labels) {
		const char *p = c->labels;

		for (;;) {
			const char *e = strchr(p, ','), *eq;
			size_t n = e ? (size_t)(e - p) : strlen(p);

			eq = memchr(p, '=', n);
			if (!eq || eq == p)
				lg_die_flag("--labels: expected k=v[,k=v...], got '%s'",
					    c->labels);
			if (!e)
				break;
			p = e + 1;
		}
	}
	if (pids) {
		char *dup = strdup(pids), *save = NULL, *t;

		for (t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
			if (c->n_pids == DS_PIDS_MAX)
				lg_die_flag("--cpu-pids: at most %d", DS_PIDS_MAX);
			c->pids[c->n_pids++] = (int)lg_parse_num("--cpu-pids", t, 1,
								 4194304);
		}
		free(dup);
	}
	g.stamp_key_len = (size_t)snprintf(g.stamp_key, sizeof(g.stamp_key),
					   "\"%s\":", c->stamp_field);
}

int
main(int argc, char **argv)
{
	struct lws_context_creation_info info;
	unsigned i;

	lg_init("dash-sub");
	parse_args(argc, argv);
	if (lg_raise_nofile("--connections", g.c.connections))
		exit(2);
	signal(SIGPIPE, SIG_IGN);

	g.conns = lg_xcalloc(g.c.connections, sizeof(*g.conns));
	for (i = 0; i < g.c.connections; i++)
		g.conns[i].idx = i;

	lws_set_log_level(lg_lws_log_levels(), lws_log_emit);
	lg_context_info(&info, protocols);
	g.ctx = lws_create_context(&info);
	if (!g.ctx) {
		fprintf(stderr, "dash-sub: cannot create the lws context (is the "
			"libev plugin, libwebsockets-evlib-ev, installed?)\n");
		return 1;
	}
	lg_signals_install(g.ctx);

	g.start_us = g.last_stats_us = lg_mono_us();
	lg_bucket_init(&g.connect_bucket, g.c.connect_rate, g.start_us);
	lws_sul_schedule(g.ctx, 0, &g.sul_connect, connect_cb, 0);
	lg_heartbeat_start(g.ctx);
	lws_sul_schedule(g.ctx, 0, &g.sul_window, window_cb,
			 (lws_usec_t)(g.c.warmup * 1e6));
	if (g.c.settle < 0)   /* else window_cb schedules the stop */
		lws_sul_schedule(g.ctx, 0, &g.sul_stop, stop_cb,
				 (lws_usec_t)(g.c.duration * 1e6));
	if (g.c.stats_interval > 0)
		lg_stats_start(g.ctx, g.c.stats_interval, print_stats);
	if (g.c.mqtt)
		lws_sul_schedule(g.ctx, 0, &g.sul_mqtt_ping, mqtt_ping_cb,
				 DS_MQTT_KEEPALIVE_S / 2 * LWS_USEC_PER_SEC);
	lg_run(g.ctx, &g.destroying);
	g.ctx = NULL;
	if (g.c.stats_interval > 0)
		print_stats(lg_mono_us());
	print_summary();
	for (i = 0; i < g.c.connections; i++)
		free(g.conns[i].rx.buf);
	free(g.conns);
	free(g.tx);
	lg_endpoint_free(&g.c.ep);
	return 0;
}
